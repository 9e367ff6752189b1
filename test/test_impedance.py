"""Joint impedance commands: the control law's split, the simulated fast loop, the message."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_ros.control.impedance import impedance_command
from metarl_ros.control.law import effort_command
from metarl_ros.sim.arm_sim import ArmSimulation
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams

N = 7


@pytest.fixture(scope="module")
def setup():
    return load_env_setup("sim/envs/iiwa7_compliant.yaml")


def _reference(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=N) * 0.3, rng.normal(size=N) * 0.4, rng.normal(size=N)


def test_the_fast_loop_commands_the_ticks_efforts_at_the_ticks_instant(setup):
    law = setup.law
    reference = _reference()
    q, qd = reference[0] + 0.01, reference[1] - 0.05
    action = np.linspace(-0.5, 0.5, N)
    efforts = effort_command(law, action, q, qd, reference)
    command = impedance_command(law, efforts, q, qd, reference, safe=False)
    np.testing.assert_array_equal(command.position, reference[0])
    np.testing.assert_array_equal(command.velocity, reference[1])
    np.testing.assert_array_equal(command.acceleration, reference[2])
    kp, kd = np.asarray(law.feedback.kp), np.asarray(law.feedback.kd)
    fast_loop = kp * (command.position - q) + kd * (command.velocity - qd) + command.feed_forward
    np.testing.assert_allclose(fast_loop, efforts, rtol=0, atol=1e-9)
    # the feed-forward is what the law adds to its PD: the action and the nominal model
    assert not np.allclose(command.feed_forward, efforts)


def test_a_safe_tick_is_a_compliant_hold_where_the_arm_is(setup):
    q, qd = np.full(N, 0.2), np.full(N, 0.7)
    command = impedance_command(setup.law, np.ones(N), q, qd, _reference(), safe=True)
    np.testing.assert_array_equal(command.position, q)
    assert not command.velocity.any() and not command.feed_forward.any()
    before_reference = impedance_command(setup.law, np.ones(N), q, qd, None, safe=False)
    np.testing.assert_array_equal(before_reference.position, q)


def _sim(setup):
    robot = setup.robot
    sim = ArmSimulation(robot, sim_rate_hz=setup.config.sim_rate_hz,
                        gravity_compensation=setup.config.gravity_compensation,
                        robot_file=setup.robot_path)
    q0 = np.asarray(robot.default_pose)
    sim.reset(q0, np.zeros(N), task=TaskParams(payload_mass=1.5))
    return sim, q0


def test_zero_gains_are_the_held_effort(setup):
    """kp = kd = 0: the impedance loop is the feed-forward held, as ``step`` holds efforts."""
    ff = np.linspace(-3.0, 3.0, N)
    states = []
    for impedance in (False, True):
        sim, q0 = _sim(setup)
        try:
            for _ in range(5):
                if impedance:
                    sim.step_impedance(q0, np.zeros(N), np.zeros(N), ff, np.zeros(N), np.zeros(N),
                                       substeps=10)
                else:
                    sim.step(ff, substeps=10)
            states.append(sim.true_state().position)
        finally:
            sim.close()
    np.testing.assert_array_equal(states[0], states[1])


def test_the_loop_is_closed_at_every_physics_step(setup):
    """Holding a pose against a 1.5 kg payload: the PD recomputed at 1 kHz holds it better
    than the same PD's effort held over a 10-ms control period (which also rings)."""
    kp, kd = np.asarray(setup.law.feedback.kp), np.asarray(setup.law.feedback.kd)
    errors = {}
    for impedance in (False, True):
        sim, q0 = _sim(setup)
        worst = 0.0
        try:
            for _ in range(100):
                if impedance:
                    sim.step_impedance(q0, np.zeros(N), np.zeros(N), np.zeros(N), kp, kd,
                                       substeps=10)
                else:
                    state = sim.true_state()
                    sim.step(kp * (q0 - state.position) - kd * state.velocity, substeps=10)
                worst = max(worst, float(np.linalg.norm(sim.true_state().position - q0)))
        finally:
            sim.close()
        errors[impedance] = worst
    assert errors[True] > 0.0
    assert errors[True] < errors[False], errors


def test_bad_impedance_inputs_are_named(setup):
    sim, q0 = _sim(setup)
    try:
        with pytest.raises(ValueError, match="impedance velocity must have shape"):
            sim.step_impedance(q0, np.zeros(3), np.zeros(N), np.zeros(N), np.zeros(N),
                               np.zeros(N))
        with pytest.raises(ValueError, match="kp contains non-finite"):
            sim.step_impedance(q0, np.zeros(N), np.zeros(N), np.zeros(N), np.full(N, np.nan),
                               np.zeros(N))
    finally:
        sim.close()


def test_impedance_messages_are_matched_by_name_and_checked():
    pytest.importorskip("trajectory_msgs")
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from metarl_ros.nodes.commands import impedance_values

    names = ["a", "b", "c"]
    msg = JointTrajectory(joint_names=["c", "a", "b"], points=[JointTrajectoryPoint(
        positions=[3.0, 1.0, 2.0], velocities=[30.0, 10.0, 20.0], effort=[])])
    values, problem = impedance_values(msg, names)
    assert problem == ""
    np.testing.assert_array_equal(values, [1, 2, 3, 10, 20, 30, 0, 0, 0, 0, 0, 0])
    # a point reached 0.1 s after arrival on a parabola: back to the state at arrival
    msg.points[0].time_from_start.nanosec = 100_000_000
    msg.points[0].accelerations = [300.0, 100.0, 200.0]
    values, _ = impedance_values(msg, names)
    acceleration = np.array([100.0, 200.0, 300.0])
    velocity = np.array([10.0, 20.0, 30.0]) - acceleration * 0.1
    position = np.array([1.0, 2.0, 3.0]) - (velocity + 0.5 * acceleration * 0.1) * 0.1
    np.testing.assert_allclose(values[:6], np.concatenate([position, velocity]))
    for bad, needle in (
        (JointTrajectory(joint_names=names, points=[]), "0 points"),
        (JointTrajectory(joint_names=["a", "b", "x"], points=msg.points), "not the robot's"),
        (JointTrajectory(joint_names=names, points=[JointTrajectoryPoint(positions=[1.0])]),
         "1 positions, expected 3"),
    ):
        values, problem = impedance_values(bad, names)
        assert values is None and needle in problem
