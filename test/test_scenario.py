"""Scenario YAML schema and the /sim/set_task JSON format."""

import json

import pytest

from metarl_ros.core.resources import resolve_path
from metarl_ros.core.schema import ConfigError
from metarl_ros.sim.robot import load_robot_spec
from metarl_ros.sim.scenario import load_scenario, parse_task_command, task_to_json
from metarl_ros.sim.tasks import TaskParams

JOINTS = load_robot_spec(resolve_path("sim/robots/iiwa7.yaml")).joint_names


def test_default_scenario_payload_then_damage():
    scenario = load_scenario(resolve_path("config/scenarios/default.yaml"), JOINTS)
    assert scenario.initial_task == TaskParams().normalized(7)
    payload, damage = scenario.events
    assert payload.time_s == 3.0 and payload.task.payload_mass == 2.5
    assert damage.time_s == 7.0
    assert damage.task.payload_mass == 2.5  # cumulative: the payload is still held
    assert damage.task.motor_strength == (1.0, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert scenario.config.duration_s == 10.0


def _write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("body,needle", [
    ("events:\n  - {time_s: 2.0, change: {payload_mass: 1.0}}\n"
     "  - {time_s: 1.0, change: {payload_mass: 2.0}}\n", "in order of time_s"),
    ("events:\n  - {time_s: 1.0, change: {motor_strength: {nope: 0.5}}}\n", "events.0.change"),
    ("events:\n  - {time_s: 1.0, change: {motor_strength: [1.0, 0.5]}}\n", "2 entries"),
    ("events:\n  - {time_s: 1.0, change: {payload_mass: -1.0}}\n", "payload_mass"),
    ("events:\n  - {time_s: 1.0, change: {motor_strength: {lbr_iiwa_joint_1: 1.5}}}\n", "<= 1"),
    ("events:\n  - {time_s: 1.0, chnage: {}}\n", "chnage"),
    ("duration_s: 1.0\nevents:\n  - {time_s: 2.0, change: {}}\n", "before duration_s"),
])
def test_bad_scenarios_name_the_problem(tmp_path, body, needle):
    with pytest.raises(ConfigError) as info:
        load_scenario(_write(tmp_path, "name: bad\n" + body), JOINTS)
    assert needle in str(info.value) and "s.yaml" in str(info.value)


def test_locked_joints_by_name_and_base_nominal(tmp_path):
    path = _write(tmp_path, """name: lock
initial: {payload_mass: 1.0}
events:
  - {time_s: 1.0, change: {locked_joints: [lbr_iiwa_joint_3, 4]}}
  - {time_s: 2.0, base: nominal, change: {sensor_noise_std: 0.001}}
""")
    scenario = load_scenario(path, JOINTS)
    assert scenario.events[0].task.locked_joints == (2, 4)
    assert scenario.events[0].task.payload_mass == 1.0
    nominal_again = scenario.events[1].task
    assert nominal_again.payload_mass == 0.0 and nominal_again.locked_joints == ()


def test_task_command_json():
    current = TaskParams(payload_mass=2.0).normalized(7)
    command = json.dumps({"label": "weak", "motor_strength": {"lbr_iiwa_joint_2": 0.3}})
    task, label = parse_task_command(command, current, JOINTS)
    assert label == "weak" and task.payload_mass == 2.0 and task.motor_strength[1] == 0.3
    task, _ = parse_task_command('{"base": "nominal"}', current, JOINTS)
    assert task == TaskParams().normalized(7)
    for bad in ("not json", '{"payload_mass": "heavy"}', '{"locked_joints": [99]}', "[]"):
        with pytest.raises(ConfigError):
            parse_task_command(bad, current, JOINTS)
    decoded = json.loads(task_to_json(current, 1.5, "x"))
    assert decoded["time_s"] == 1.5 and decoded["task"]["payload_mass"] == 2.0
    assert TaskParams.from_dict(decoded["task"]) == current
