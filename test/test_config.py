"""Bad configuration inputs fail early with a ConfigError naming the file and the field.

Each case copies the shipped ``sim/`` YAMLs into ``tmp_path``, breaks one field of one file,
loads the env config (which loads the robot and task files it names) and checks that the
error starts with the broken file's path and mentions the field.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metarl_ros.core.resources import share_directory
from metarl_ros.core.schema import ConfigError
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.robot import load_robot_spec
from metarl_ros.sim.tasks import TaskParams, load_task_suite

ENV = "envs/iiwa7_tracking.yaml"
ROBOT = "robots/iiwa7.yaml"
TASKS = "tasks/iiwa7_faults.yaml"


@pytest.fixture
def sim_copy(tmp_path: Path) -> Path:
    target = tmp_path / "sim"
    shutil.copytree(share_directory() / "sim", target)
    return target


def break_file(sim_dir: Path, relative: str, old: str | None, new: str) -> Path:
    """Replace ``old`` (exactly once) by ``new`` in a copied YAML; ``old=None``: whole file."""
    path = sim_dir / relative
    text = path.read_text()
    if old is None:
        text = new
    else:
        assert text.count(old) == 1, f"{old!r} not found exactly once in {relative}"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def assert_names_file(message: str, path: Path) -> None:
    """The error's first line starts with ``path`` (possibly written un-normalized)."""
    named = message.split("\n")[0].split(": ")[0]
    assert Path(named).resolve() == path.resolve(), message


CASES = [
    # (id, file, old text, new text, fragments the message must contain)
    ("robot-unknown-key", ROBOT, "effort_limits:", "effort_limit:",
     ["effort_limit: Extra inputs are not permitted", "effort_limits: Field required"]),
    ("robot-wrong-type", ROBOT, "velocity_limits: [1.71,", "velocity_limits: [fast,",
     ["velocity_limits.0", "valid number"]),
    ("robot-negative-effort-limit", ROBOT, "effort_limits: [176.0,", "effort_limits: [-176.0,",
     ["effort_limits.0", "greater than 0"]),
    ("robot-list-length", ROBOT, "armature: [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]",
     "armature: [0.1, 0.1]", ["armature has 2 entries, joint_names has 7"]),
    ("robot-action-scale-over-limit", ROBOT, "action_scale: [80.0,", "action_scale: [200.0,",
     ["action_scale[0]=200.0 exceeds effort_limits[0]"]),
    ("robot-pose-outside-limits", ROBOT, "default_pose: [0.0, 0.6,", "default_pose: [0.0, 2.6,",
     ["default_pose[1]"]),
    ("robot-invalid-yaml", ROBOT, "name: iiwa7", "name: [iiwa7: x", ["not valid YAML"]),
    ("robot-empty", ROBOT, None, "", ["file is empty"]),
    ("tasks-probability-above-1", TASKS, "payload_probability: 0.6", "payload_probability: 1.6",
     ["distributions.in_range.payload_probability", "less than or equal to 1"]),
    ("tasks-range-low-above-high", TASKS, "payload_mass_kg: {low: 0.5, high: 3.0}",
     "payload_mass_kg: {low: 3.5, high: 3.0}",
     ["distributions.in_range.payload_mass_kg", "low (3.5) must not exceed high (3.0)"]),
    ("tasks-strength-above-1", TASKS, "motor_strength: {low: 0.4, high: 1.0}",
     "motor_strength: {low: 0.4, high: 1.5}",
     ["distributions.in_range", "motor_strength must lie within [0, 1]"]),
    ("tasks-negative-friction", TASKS, "coulomb_friction_nm: {low: 0.0, high: 1.5}",
     "coulomb_friction_nm: {low: -1.0, high: 1.5}",
     ["distributions.in_range", "coulomb_friction_nm must be >= 0"]),
    ("tasks-unknown-distribution", TASKS, "heldout: {distribution: in_range",
     "heldout: {distribution: in_rnage", ["splits.heldout.distribution", "'in_rnage'"]),
    ("tasks-missing-split", TASKS, "  ood: {distribution: ood, num_tasks: 30, seed: 13}\n", "",
     ["splits is missing ['ood']"]),
    ("tasks-unknown-key", TASKS, "lock_probability: 0.15", "lock_probabilty: 0.15",
     ["distributions.in_range.lock_probabilty", "Extra inputs are not permitted"]),
    ("tasks-wrong-type", TASKS, "num_tasks: 240", "num_tasks: many",
     ["splits.train.num_tasks", "valid integer"]),
    ("tasks-joint-beyond-robot", TASKS, "lockable_joints: [0, 2, 4, 6]",
     "lockable_joints: [0, 2, 4, 9]", ["distributions.ood.lockable_joints", "[9]"]),
    ("env-missing-robot-file", ENV, "robot: ../robots/iiwa7.yaml", "robot: ../robots/iiwa8.yaml",
     ["robot:", "'../robots/iiwa8.yaml' not found"]),
    ("env-missing-tasks-file", ENV, "tasks: ../tasks/iiwa7_faults.yaml", "tasks: ../tasks/no.yaml",
     ["tasks:", "'../tasks/no.yaml' not found"]),
    ("env-wrong-type", ENV, "sim_rate_hz: 500.0", "sim_rate_hz: fast",
     ["sim_rate_hz", "valid number"]),
    ("env-negative-rate", ENV, "control_rate_hz: 100.0", "control_rate_hz: -100.0",
     ["control_rate_hz", "greater than 0"]),
    ("env-rates-not-multiple", ENV, "control_rate_hz: 100.0", "control_rate_hz: 300.0",
     ["sim_rate_hz (500.0) must be a whole multiple of control_rate_hz (300.0)"]),
    ("env-unknown-nested-key", ENV, "  velocity_scale: 0.2", "  velocity_scal: 0.2",
     ["observation.velocity_scal", "Extra inputs are not permitted"]),
    ("env-reference-length", ENV, "centre_jitter: [0.3, 0.2, 0.3, 0.2, 0.3, 0.2, 0.3]",
     "centre_jitter: [0.3, 0.2]", ["reference.centre_jitter", "needs 7 entries"]),
    ("env-negative-effort-weight", ENV, "effort_weight: 0.05", "effort_weight: -0.05",
     ["reward.effort_weight", "greater than or equal to 0"]),
    ("env-not-a-mapping", ENV, None, "- robot\n- tasks\n", ["<root>", "valid dictionary"]),
]


@pytest.mark.parametrize(
    ("relative", "old", "new", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_broken_field_is_named_with_its_file(sim_copy, relative, old, new, fragments):
    broken = break_file(sim_copy, relative, old, new)
    with pytest.raises(ConfigError) as caught:
        load_env_setup(sim_copy / ENV)
    message = str(caught.value)
    assert_names_file(message, broken)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_unbroken_copy_loads(sim_copy):
    setup = load_env_setup(sim_copy / ENV)
    assert setup.robot.num_joints == 7
    assert setup.robot_path.resolve() == (sim_copy / ROBOT).resolve()


@pytest.mark.parametrize("loader", [load_env_setup, load_robot_spec, load_task_suite])
def test_missing_file_is_named(tmp_path, loader):
    missing = tmp_path / "nowhere" / "config.yaml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        loader(missing)
    assert_names_file(str(caught.value), missing)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------- TaskParams.validate


@pytest.mark.parametrize(
    ("task", "match"),
    [
        (TaskParams(motor_strength=(1.0, 1.0, 1.0)), "motor_strength has 3 entries, robot has 7"),
        (TaskParams(coulomb_friction=(0.1,) * 8), "coulomb_friction has 8 entries"),
        (TaskParams(viscous_damping=(0.1,) * 6), "viscous_damping has 6 entries"),
        (TaskParams(motor_strength=(1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0)), "motor_strength.*<= 1"),
        (TaskParams(motor_strength=(1.0, -0.1, 1.0, 1.0, 1.0, 1.0, 1.0)), "motor_strength.*>= 0"),
        (TaskParams(coulomb_friction=(float("nan"),) * 7), "coulomb_friction.*finite"),
        (TaskParams(locked_joints=(7,)), r"locked joint index 7 out of range \[0, 7\)"),
        (TaskParams(locked_joints=(-1,)), "locked joint index -1 out of range"),
        (TaskParams(payload_mass=-1.0), "payload_mass must be >= 0"),
        (TaskParams(payload_mass=float("inf")), "payload_mass"),
        (TaskParams(payload_offset=(0.0, 0.1)), "payload_offset must have 3 entries"),
        (TaskParams(sensor_noise_std=-0.001), "sensor_noise_std"),
        (TaskParams(actuator_delay_s=-0.01), "actuator_delay_s"),
    ],
)
def test_task_params_validate_names_the_field(task, match):
    with pytest.raises(ValueError, match=match):
        task.validate(7)


def test_valid_task_params_pass_and_from_dict_rejects_unknown_keys():
    TaskParams().validate(7)
    TaskParams(
        payload_mass=2.0, payload_offset=(0.0, 0.0, 0.05), motor_strength=(0.5,) * 7,
        locked_joints=(0, 6), coulomb_friction=(1.0,) * 7, sensor_noise_std=0.001,
        actuator_delay_s=0.004,
    ).validate(7)
    task = TaskParams(payload_mass=1.0, locked_joints=(2,))
    assert TaskParams.from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="payload_mas"):
        TaskParams.from_dict({"payload_mas": 1.0})


@pytest.mark.parametrize("command", ["train", "retrain", "demo"])
def test_non_utf8_yaml_is_one_named_error_not_a_traceback(tmp_path, capsys, command):
    """Training, retrain and scenario YAMLs with non-UTF-8 bytes: one line naming the file."""
    from metarl_ros.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"method: pearl\nname: \xff\xfe caf\xe9\n")
    argv = {
        "train": ["train", "--config", str(bad), "--out", str(tmp_path / "run")],
        "retrain": ["retrain", "--bag", str(tmp_path), "--model", "models/pearl/model.pt",
                    "--out", str(tmp_path / "out"), "--config", str(bad)],
        "demo": ["demo", "--no-ros", "--scenario", str(bad), "--out", str(tmp_path / "demo")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not UTF-8 text (byte 0xff on line 2)" in err, err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
