"""`metarl demo`: the adapt_sim node graph over DDS (loopback) on the shipped model, headless.

The ROS runs use a 4 s scenario (payload at 2 s) instead of the default 10 s one, so the module
stays fast; the demo is run once per mode (module fixtures) and its outputs checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl_ros.cli.main import main
from metarl_ros.core.resources import resolve_path
from metarl_ros.core.schema import ConfigError
from metarl_ros.demo.report import PhaseWindows, format_table
from metarl_ros.evaluation.trace import TraceRecorder
from metarl_ros.sim.scenario import ScenarioConfig, resolve_scenario

REPO = Path(__file__).resolve().parent.parent
MODEL = "models/pearl/model.pt"
JOINTS = [f"lbr_iiwa_joint_{i}" for i in range(1, 8)]
SCENARIO = """\
name: short_payload
description: 4 s, a 2.5 kg payload at 2 s
reference_seed: 0
duration_s: 4.0
events:
  - time_s: 2.0
    label: payload
    change: {payload_mass: 2.5, payload_offset: [0.0, 0.05, 0.05]}
"""
RUNS = ("pd", "dob", "adaptive_ct", "adaptive_ff", "adaptation_off", "pearl", "pearl_maml",
        "pearl_adapt")


def _model_or_skip() -> None:
    if not resolve_path(MODEL).exists():
        pytest.skip(f"no shipped model at {MODEL}")
    pytest.importorskip("torch")


def _demo(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`metarl demo` as `make demo` runs it (own process, DDS on loopback)."""
    scenario = tmp / "scenario.yaml"
    scenario.write_text(SCENARIO)
    env = dict(os.environ, ROS_LOCALHOST_ONLY="1", ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONUNBUFFERED="1")
    if "--no-ros" not in args:
        from ros_harness import domain_id  # rclpy

        env["ROS_DOMAIN_ID"] = str(domain_id(offset=89))
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "metarl_ros.cli.main", "demo", "--scenario", str(scenario),
         "--out", str(out), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text()) if proc.returncode == 0 else {}
    return proc, summary


@pytest.fixture(scope="module")
def ros_demo(tmp_path_factory):
    _model_or_skip()
    pytest.importorskip("rclpy")
    tmp = tmp_path_factory.mktemp("demo_ros")
    proc, summary = _demo(tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, summary, tmp / "out"


@pytest.fixture(scope="module")
def direct_demo(tmp_path_factory):
    _model_or_skip()
    proc, summary = _demo(tmp_path_factory.mktemp("demo_direct"), "--no-ros")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return summary


def _values(errors: dict) -> list[float]:
    return [errors["before_faults"], errors["payload"]["right_after"],
            errors["payload"]["adapted"]]


# ------------------------------------------------------------------------------ through ROS


def test_demo_runs_the_graph_and_writes_summary_and_plot(ros_demo):
    proc, summary, out = ros_demo
    assert "Traceback" not in proc.stdout + proc.stderr
    assert summary["mode"] == "ros" and summary["real_time_factor"] == 0.0
    assert summary["scenario"]["events"] == [{"time_s": 2.0, "label": "payload"}]
    assert list(summary["runs"]) == list(RUNS)
    for name, run in summary["runs"].items():
        values = _values(run["tracking_error_rad"])
        assert all(math.isfinite(v) and 0.0 < v < 1.0 for v in values), (name, values)
        assert run["samples"] == 400, name  # one per control instant, 100 Hz x 4 s
        assert run["events_seen"] == [{"time_s": 2.0, "label": "payload"}], name
        assert run["nodes"]["sim_node"]["sim_time_s"] == pytest.approx(4.0)
        assert run["nodes"]["adapter_node"]["policy_errors"] == 0
        assert run["nodes"]["adapter_node"]["safe_ticks"] == 0
        # the table row printed for it carries the same numbers, in mrad to 2 decimals
        row = next(line for line in proc.stdout.splitlines() if line.startswith(name + " "))
        assert [float(v) for v in row.replace("|", " ").split()[1:]] == pytest.approx(
            [round(v * 1e3, 2) for v in values], abs=1e-9)
    assert summary["problems"] == []
    png = (out / "tracking_error.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_adaptation_on_and_off_are_different_runs(ros_demo):
    """Each run's adapter_node reports the parameters it really ran with and how many MAML
    adaptation steps it did."""
    _, summary, _ = ros_demo
    nodes = {name: run["nodes"]["adapter_node"] for name, run in summary["runs"].items()}
    assert [nodes[name]["policy"] for name in RUNS] == ["pd", "dob", "adaptive_ct", "pd",
                                                        "pearl", "pearl", "pearl", "pearl"]
    learned = RUNS[4:]
    assert [nodes[name]["adaptation"] for name in learned] == [False, True, True, True]
    assert [nodes[name]["maml"] for name in learned] == [False, False, True, False]
    assert [name for name in RUNS if nodes[name]["parameter_adaptation"]] == [
        "adaptive_ff", "pearl_adapt"]
    # lockstep: MAML steps follow the transitions (every adapt_every), not the wall clock
    assert nodes["pearl_maml"]["adaptation_schedule"] == "inline"
    assert nodes["adaptation_off"]["maml_adaptations"] == 0
    assert nodes["pearl"]["maml_adaptations"] == 0
    assert nodes["pearl_maml"]["maml_adaptations"] > 0
    assert "maml_adaptations" not in nodes["pd"]
    # What the shipped models (trained on the compliant env: PEARL is a residual on the PD +
    # nominal feed-forward) really do in this scenario, as relations with margin. Measured
    # [before faults, payload right after, adapted], mrad: pd 0.50 / 76.2 / 95.7,
    # adaptation_off 21.7 / 62.2 / 80.6, pearl 2.7 / 41.8 / 39.5, adaptive_ff 0.46 / 59.5 /
    # 35.6 (docs/BENCHMARKS.md: PEARL costs accuracy on the intact arm, where the exact
    # nominal feed-forward needs no help).
    runs = {name: _values(summary["runs"][name]["tracking_error_rad"]) for name in RUNS}
    pd, off, pearl = runs["pd"], runs["adaptation_off"], runs["pearl"]
    # The feed-forward is in the graph's control law: PD + the exact model on the intact arm
    # tracks to well under a mrad (the PD alone: ~26 mrad, docs/ENVIRONMENT.md).
    assert pd[0] < 2e-3
    # Adaptation on is not adaptation off: the inferred latent beats the prior's in every
    # window (measured 1.5-8x).
    assert all(on < off_ / 1.3 for on, off_ in zip(pearl, off)), (pearl, off)
    # Once adapted to the payload, the learned residual beats the non-adapting model-based
    # controller (measured 2.4x).
    assert pearl[2] < pd[2] / 1.5, (pearl, pd)
    # The parameter adaptation learns the payload through the model: 2 s after the pick-up it
    # beats the non-adapting controller (measured 35.6 vs 95.7 mrad) and still improves.
    adaptive_ff = runs["adaptive_ff"]
    assert adaptive_ff[2] < pd[2] / 2, (adaptive_ff, pd)
    assert adaptive_ff[2] < adaptive_ff[1], adaptive_ff


def test_graph_in_lockstep_reproduces_the_env(ros_demo, direct_demo):
    """In lockstep sim_node steps exactly like the Gymnasium env, so deterministic controllers
    give the same errors through DDS as on the env (`--no-ros`), unless a lockstep timeout
    (the simulator stepping with zero effort) hit the run -- which the demo must then say."""
    _, summary, _ = ros_demo
    assert list(direct_demo["runs"]) == list(RUNS)
    for name in RUNS:
        run = summary["runs"][name]
        through_ros = _values(run["tracking_error_rad"])
        direct = _values(direct_demo["runs"][name]["tracking_error_rad"])
        if run["nodes"]["sim_node"]["lockstep_timeouts"]:
            assert any(w.startswith(f"{name}: ") and "lockstep timeout" in w
                       for w in summary["warnings"])
        else:
            # measured: equal to 1e-5 relative (float64 messages vs the env's float32 path)
            assert through_ros == pytest.approx(direct, rel=1e-3), name


# ------------------------------------------------------------------------------ errors


def test_missing_model_and_bad_scenario_are_named(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "nope.pt: no model file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nduration_s: 3.0\nevents:\n  - time_s: 1.0\n"
                   "    change: {motor_strength: {elbow: 0.5}}\n")
    assert main(["demo", "--scenario", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown joint 'elbow'" in capsys.readouterr().err
    assert main(["demo", "--scenario", str(bad), "--duration", "0.5",
                 "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "summary.json").exists()


# ------------------------------------------------------------------------------ metric


def _scenario(text: str):
    import yaml

    return resolve_scenario(ScenarioConfig.model_validate(yaml.safe_load(text)), JOINTS)


def test_phase_windows_follow_the_scenario():
    windows = PhaseWindows.for_scenario(_scenario(SCENARIO), 4.0)
    assert windows.before_faults == (1.0, 2.0)
    (event,) = windows.events
    assert (event.label, event.right_after, event.adapted) == ("payload", (2.0, 2.5), (3.0, 4.0))
    two = _scenario("name: two\nevents:\n  - {time_s: 1.0, label: a, change: {payload_mass: 1.0}}"
                    "\n  - {time_s: 1.2, label: b, change: {payload_mass: 2.0}}\n")
    windows = PhaseWindows.for_scenario(two, 3.0)
    assert windows.before_faults == (0.5, 1.0)  # the settling skip shrinks before an early fault
    assert [(e.right_after, e.adapted) for e in windows.events] == [
        ((1.0, 1.2), (1.0, 1.2)), ((1.2, 1.7), (2.0, 3.0))]


@pytest.mark.parametrize("text, duration, needle", [
    (SCENARIO, 2.0, "not before the end of the run"),
    ("name: d\nevents:\n  - {time_s: 1.0, label: x, change: {payload_mass: 1.0}}\n"
     "  - {time_s: 2.0, label: x, change: {payload_mass: 2.0}}\n", 3.0, "several events"),
])
def test_phase_windows_refuse_what_cannot_be_measured(text, duration, needle):
    with pytest.raises(ConfigError, match=needle):
        PhaseWindows.for_scenario(_scenario(text), duration)


def test_trace_pairs_states_and_references_by_stamp_and_joint_name():
    recorder = TraceRecorder()
    names = JOINTS[:3]
    for k in range(4):
        q_ref = np.array([0.1 * k, 0.2, 0.3])
        recorder.add_reference(k * 10_000_000, names, q_ref)
        if k == 3:
            continue  # a reference without its joint state is not an error sample
        q = q_ref + np.array([0.0, 0.0, 0.01 * (k + 1)])
        # the state lists the joints in another order, with an extra joint
        recorder.add_state(k * 10_000_000, ["gripper", names[2], names[0], names[1]],
                           [9.0, q[2], q[0], q[1]])
    recorder.add_event(0.02, "fault")
    trace = recorder.trace()
    assert trace.time_s == pytest.approx([0.0, 0.01, 0.02])
    assert trace.tracking_error == pytest.approx([0.01, 0.02, 0.03])
    assert trace.mean_between(0.01, 0.03) == pytest.approx(0.025)
    assert trace.mean_between(0.5, 1.0) is None
    assert trace.events == ((0.02, "fault"),)


def test_table_has_a_row_per_run_and_marks_missing_windows():
    windows = PhaseWindows.for_scenario(_scenario(SCENARIO), 4.0)
    table = format_table(windows, {
        "pd": {"before_faults": 0.0124, "payload": {"right_after": 0.07, "adapted": 0.09}},
        "adaptation_on": {"before_faults": None,
                          "payload": {"right_after": 0.005, "adapted": 0.006}},
    })
    rows = {line.split()[0]: line for line in table.splitlines()[3:]}
    assert rows["pd"].split() == ["pd", "12.40", "|", "70.00", "90.00"]  # mrad
    assert rows["adaptation_on"].split()[1] == "n/a"
    assert "payload" in table.splitlines()[0]
