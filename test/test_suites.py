"""The fault suites (``sim/suites/*.yaml``): schema, draws and their disjointness, scope, and
``metarl eval --tasks FILE`` on a suite of one's own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.core.resources import share_directory
from metarl_ros.core.schema import ConfigError
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.suites import (
    DRAW_NAMES,
    check_disjoint,
    draw_suite,
    find_suite,
    load_suite,
    outside_training,
    shipped_suites,
)

SETUP = load_env_setup()
SCALE = SETUP.robot.friction_scale
TRAINING = SETUP.tasks.distributions["in_range"]
FAMILIES = {"payload", "motor_weakness", "locked_joint", "friction_damping", "actuator_delay",
            "sensor_noise", "mix"}


def test_one_suite_per_family_plus_the_mix_with_both_draws():
    suites = shipped_suites()
    assert set(suites) == FAMILIES
    seeds = []
    for name, path in suites.items():
        suite = load_suite(path)
        assert suite.name == name and suite.config.family
        assert set(suite.config.draws) == set(DRAW_NAMES)
        seeds += [d.seed for d in suite.config.draws.values()]
        text = path.read_text()
        # the file says which draw is which and that choices look at validation only
        assert "`validation` is the only draw any choice" in text and "`report`" in text
    assert len(seeds) == len(set(seeds)), "every draw of every suite has its own seed"


def test_each_suite_covers_in_range_and_beyond_training():
    untrained_joints = False
    for name, path in shipped_suites().items():
        suite = load_suite(path)
        scopes = {c.scope for c in suite.config.conditions.values()}
        assert scopes == {"in_range", "beyond"}, name
        for condition, spec in suite.config.conditions.items():
            outside = outside_training(suite.distributions[condition], TRAINING)
            if spec.scope == "in_range":
                assert outside == [], (name, condition, outside)
            else:
                assert outside, (name, condition)
                untrained_joints |= bool({"damageable_joints", "lockable_joints"} & set(outside))
    assert untrained_joints, "some suite damages joints that training never damages"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_draws_are_deterministic_and_disjoint(name):
    suite = load_suite(find_suite(name))
    validation = draw_suite(suite, "validation", SCALE)
    report = draw_suite(suite, "report", SCALE)
    check_disjoint(validation, report)
    seeds = [e.seed for e in validation.episodes] + [e.seed for e in report.episodes]
    assert len(seeds) == len(set(seeds))
    for drawn in (validation, report):
        spec = suite.config.draws[drawn.draw]
        assert len(drawn.episodes) == (
            len(suite.config.conditions) * spec.tasks_per_condition * spec.episodes_per_task
        )
        low, high = suite.config.fault_time_s.low, suite.config.fault_time_s.high
        assert all(low <= e.fault_time_s <= high for e in drawn.episodes)
        assert all(drawn.tasks[e.task_index] == e.task for e in drawn.episodes)
        distinct = [t.key() for t, c in zip(drawn.tasks, drawn.task_condition)
                    if c not in drawn.repeating]
        assert len(distinct) == len(set(distinct))
    shared = {t.key() for t in validation.tasks} & {t.key() for t in report.tasks}
    assert not shared or suite.config.conditions.keys() == validation.repeating
    again = draw_suite(load_suite(find_suite(name)), "report", SCALE)
    assert again.episodes == report.episodes


def test_single_family_suites_change_only_their_family():
    intact = {"payload_mass": 0.0, "motor_strength": (1.0,) * 7, "locked_joints": (),
              "coulomb_friction": (0.0,) * 7, "viscous_damping": (0.0,) * 7,
              "sensor_noise_std": 0.0, "actuator_delay_s": 0.0}
    changes = {"payload": {"payload_mass"}, "motor_weakness": {"motor_strength"},
               "locked_joint": {"locked_joints"},
               "friction_damping": {"coulomb_friction", "viscous_damping"},
               "actuator_delay": {"actuator_delay_s"}, "sensor_noise": {"sensor_noise_std"}}
    for name, changed in changes.items():
        for task in draw_suite(load_suite(find_suite(name)), "validation", SCALE).tasks:
            different = {k for k, v in intact.items() if getattr(task, k) != v}
            assert different == changed, (name, task)


def test_a_smaller_count_draws_a_prefix():
    suite = load_suite(find_suite("payload"))
    full = draw_suite(suite, "report", SCALE)
    few = draw_suite(suite, "report", SCALE, tasks_per_condition=3)
    for condition in suite.config.conditions:
        first = [t for t, c in zip(full.tasks, full.task_condition) if c == condition][:3]
        assert [t for t, c in zip(few.tasks, few.task_condition) if c == condition] == first


def test_overlapping_draws_are_caught():
    drawn = draw_suite(load_suite(find_suite("payload")), "validation", SCALE)
    with pytest.raises(ConfigError, match="share 20 task"):
        check_disjoint(drawn, drawn)


def _suite(**changes) -> dict:
    data = yaml.safe_load(find_suite("payload").read_text())
    data.update(changes)
    return data


@pytest.mark.parametrize("data, message", [
    (_suite(draws={"validation": {"seed": 1, "tasks_per_condition": 2}}),
     "draws is missing \\['report'\\]"),
    (_suite(draws={"validation": {"seed": 1, "tasks_per_condition": 2},
                   "report": {"seed": 1, "tasks_per_condition": 2}}), "must differ"),
    (_suite(conditions={"x": {"scope": "beyond", "description": "both sources",
                              "faults": {"actuator_delay_s": {"low": 0.0, "high": 0.01}},
                              "distribution_of": {"file": "a.yaml", "distribution": "b"}}}),
     "exactly one of faults and distribution_of"),
    (_suite(conditions={"x": {"scope": "sideways", "description": "bad scope",
                              "faults": {}}}), "conditions.x.scope"),
    (_suite(colour="red"), "colour: Extra inputs are not permitted"),
    (_suite(conditions={"x": {"scope": "beyond", "description": "reversed",
                              "faults": {"payload": {"mass_kg": {"low": 5.0, "high": 1.0}}}}}),
     "must not exceed"),
])
def test_schema_errors_name_the_file_and_field(tmp_path, data, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as info:
        load_suite(path)
    assert str(path) in str(info.value)


def test_a_distribution_reference_is_checked(tmp_path):
    data = _suite(conditions={"mix": {
        "scope": "in_range", "description": "training",
        "distribution_of": {"file": str(share_directory() / "sim/tasks/iiwa7_faults.yaml"),
                            "distribution": "nope"}}})
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="has no distribution 'nope'"):
        load_suite(path)


def own_suite(folder: Path) -> Path:
    """A suite file of one's own: one payload condition, one task per draw."""
    data = _suite(name="mine", conditions={"heavy": {
        "scope": "beyond", "description": "5 kg",
        "faults": {"payload": {"mass_kg": {"low": 5.0, "high": 5.0}}}}},
        draws={"validation": {"seed": 7, "tasks_per_condition": 1, "episodes_per_task": 1},
               "report": {"seed": 8, "tasks_per_condition": 1, "episodes_per_task": 1}})
    data["conditions"]["heavy"]["faults"]["payload"]["offset_m"] = {"low": -0.05, "high": 0.05}
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.skipif(not (share_directory() / "models/nominal/model.pt").is_file(),
                    reason="no shipped model")
def test_metarl_eval_on_a_suite_file_of_ones_own(tmp_path, capsys, monkeypatch):
    from metarl_ros.evaluation import methods as registry

    # without the ceiling registered, headroom, gap closed and the recovery bound say so
    monkeypatch.delitem(registry.METHODS, "ceiling")
    out = tmp_path / "eval.json"
    models = share_directory() / "models"
    # two training runs: the model directory, and its nominal model alone (a second "seed")
    code = metarl_main(["eval", "--model", str(models), str(models / "nominal"), "--tasks",
                        str(own_suite(tmp_path)), "--draw", "both", "--methods", "nominal,pd",
                        "--json", str(out), "--plot", str(tmp_path / "plots")])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert set(result) == {"protocol", "results", "compliance"}
    assert set(result["results"]) == {"validation", "report"}
    for draw in ("validation", "report"):
        condition = result["results"][draw]["mine"]["conditions"]["heavy"]
        assert condition["scope"] == "beyond" and condition["episodes"] == 1
        assert condition["headroom"] is None  # no ceiling run
        for method in ("nominal", "pd"):
            entry = condition["methods"][method]
            assert np.isfinite(entry["post_rms_mrad"]["mean"])
            assert entry["gap_closed"] == {"value": None, "ci95": None,
                                           "reason": "no ceiling run"}
            assert "no ceiling run" in entry["recovery"]["bound"]
        assert {(p["a"], p["b"]) for p in condition["paired"]} == {("pd", "nominal")}
        nominal = condition["methods"]["nominal"]
        assert nominal["runs"] == 2 and condition["methods"]["pd"]["runs"] == 1
        assert nominal["post_rms_mrad"]["per_run"] == [nominal["post_rms_mrad"]["mean"]] * 2
        assert nominal["post_rms_mrad"]["run_spread"] == 0.0
    assert result["compliance"]["pd"]["stiffness_n_per_mm"] < 1.0  # the PD alone is compliant
    assert result["protocol"]["metrics"]["ceiling"] is None
    assert [r["methods"] for r in result["protocol"]["model_runs"]] == [["nominal"], ["nominal"]]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "report_mine.png", "summary_report.png", "summary_validation.png",
        "validation_mine.png"]


@pytest.mark.skipif(not (share_directory() / "models/nominal/model.pt").is_file(),
                    reason="no shipped model")
def test_the_ceiling_always_runs_and_defines_the_gap(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = metarl_main(["eval", "--model", str(share_directory() / "models"), "--tasks",
                        str(own_suite(tmp_path)), "--methods", "nominal,dob", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    condition = result["results"]["validation"]["mine"]["conditions"]["heavy"]
    assert set(condition["methods"]) == {"nominal", "dob", "ceiling"}
    assert condition["headroom"]["clear_of_noise"]  # 5 kg: the nominal policy lags
    assert condition["methods"]["ceiling"]["gap_closed"]["value"] == pytest.approx(1.0)
    assert condition["methods"]["nominal"]["gap_closed"]["value"] == pytest.approx(0.0)
    ceiling = condition["methods"]["ceiling"]["post_rms_mrad"]["mean"]
    assert ceiling < condition["methods"]["nominal"]["post_rms_mrad"]["mean"]
    assert result["compliance"]["ceiling"]["stiffness_n_per_mm"] < 1.0  # the PD's compliance
