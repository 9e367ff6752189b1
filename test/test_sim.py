"""Behaviour of the simulation core (ArmSimulation), the tasks/splits, the reference and the env.

Every test checks a physical or API property that a plausible bug would break; tolerances are
chosen from measured margins (noted next to them) so the tests stay stable but can fail.
Physics-level tests share one ArmSimulation (reset per test) to keep the file fast.
"""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import metarl_ros
from metarl_ros.sim.arm_sim import ArmSimulation, JointReading
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.reference import MultiSineReference, ReferenceConfig
from metarl_ros.sim.tasks import FaultEvent, TaskParams, make_split, nominal_task

N = 7  # iiwa7


# ------------------------------------------------------------------------------------ fixtures
# (setup and sim: test/conftest.py)


@pytest.fixture(scope="module")
def env(setup):
    environment = ArmTrackingEnv(setup)
    yield environment
    environment.close()


@pytest.fixture
def q0(setup) -> np.ndarray:
    return np.asarray(setup.robot.default_pose, dtype=np.float64)


def run(sim: ArmSimulation, q0, task: TaskParams, command, steps: int) -> list[JointReading]:
    """Reset at rest at ``q0`` under ``task`` and hold ``command`` for ``steps`` physics steps."""
    sim.reset(q0, np.zeros(N), task=task)
    readings = []
    for _ in range(steps):
        sim.step(np.asarray(command, dtype=np.float64))
        readings.append(sim.true_state())
    return readings


def torque(joint: int, value: float) -> np.ndarray:
    command = np.zeros(N)
    command[joint] = value
    return command


def rollout(env: ArmTrackingEnv, seed: int, actions: np.ndarray, **reset_options):
    obs, _ = env.reset(seed=seed, options=reset_options or None)
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, _, _, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards), env.sim.true_state().position


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_trajectory_different_seed_differs(setup):
    # sensor noise on, so the noise generator's seeding is covered too
    task = TaskParams(sensor_noise_std=1e-3)
    actions = np.random.default_rng(0).uniform(-0.5, 0.5, size=(100, N)).astype(np.float32)
    env_a, env_b = ArmTrackingEnv(setup, task=task), ArmTrackingEnv(setup, task=task)
    try:
        obs_a, rew_a, _ = rollout(env_a, 7, actions)
        obs_b, rew_b, _ = rollout(env_b, 7, actions)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
        obs_c, rew_c, _ = rollout(env_b, 8, actions)
        assert np.abs(obs_c - obs_a).max() > 0.1
        assert np.abs(rew_c - rew_a).max() > 1e-3
    finally:
        env_a.close()
        env_b.close()


# ---------------------------------------------------------------------------------- payload


def test_payload_changes_motion_under_same_torques(sim, q0):
    """Same torque sequence (simulator level: env actions are residuals on a PD loop)."""
    efforts = np.random.default_rng(1).uniform(-20.0, 20.0, size=(500, N))
    intact = TaskParams()
    loaded = TaskParams(payload_mass=3.0, payload_offset=(0.0, 0.0, 0.05))

    def final_position(task: TaskParams) -> np.ndarray:
        sim.reset(q0, np.zeros(N), task=task)
        for effort in efforts:
            sim.step(effort)
        return sim.true_state().position

    q_intact, q_again, q_loaded = (final_position(t) for t in (intact, intact, loaded))
    np.testing.assert_array_equal(q_intact, q_again)  # so the difference is the payload's
    assert np.abs(q_loaded - q_intact).max() > 0.1  # measured: ~0.9 rad after 1 s


def test_payload_sags_the_arm_under_gravity_compensation(sim, q0):
    steps = 250  # 0.5 s, zero command: the firmware compensates the nominal arm's gravity only
    intact = run(sim, q0, TaskParams(), np.zeros(N), steps)[-1]
    z_intact = sim.flange_position()[2]
    loaded = run(sim, q0, TaskParams(payload_mass=3.0), np.zeros(N), steps)[-1]
    z_loaded = sim.flange_position()[2]
    sim.reset(q0, np.zeros(N))
    z_start = sim.flange_position()[2]
    # intact arm holds (measured drift ~1e-16 rad)
    assert np.abs(intact.position - q0).max() < 1e-3
    assert abs(z_intact - z_start) < 1e-4
    # payload: shoulder (joint 2) and elbow (joint 4) give way, the flange drops
    # (measured: ~0.45 and ~0.53 rad, flange a few decimetres)
    assert abs(loaded.position[1] - q0[1]) > 0.05
    assert abs(loaded.position[3] - q0[3]) > 0.05
    assert z_start - z_loaded > 0.02
    assert sim.payload_position() is None  # reset without payload removes it


def test_payload_body_follows_the_flange(sim, q0):
    offset = (0.0, 0.0, 0.1)
    run(sim, q0, TaskParams(payload_mass=2.0, payload_offset=offset), torque(0, 30.0), 100)
    # the payload stays rigidly at its offset from the flange while the arm swings
    distance = np.linalg.norm(sim.payload_position() - sim.flange_position())
    assert distance == pytest.approx(0.1, abs=2e-3)


# ------------------------------------------------------------------------------------ locks


def test_locked_joint_does_not_move_and_is_free_after_unlock(sim, q0):
    command = np.zeros(N)
    command[2] = 500.0  # far beyond joint 3's 110 N*m limit
    command[0], command[3] = 50.0, 30.0  # and the others move
    readings = run(sim, q0, TaskParams(locked_joints=(2,)), command, 200)
    positions = np.array([r.position for r in readings])
    assert np.abs(positions[:, 2] - q0[2]).max() < 1e-3
    assert abs(positions[-1, 0] - q0[0]) > 0.1 and abs(positions[-1, 3] - q0[3]) > 0.1
    assert readings[-1].effort[2] == 0.0  # the locked joint's motor is idle

    sim.set_task(TaskParams())  # repaired: the brake is released
    locked_at = sim.true_state().position[2]
    for _ in range(50):
        sim.step(command)
    assert abs(sim.true_state().position[2] - locked_at) > 0.01
    assert sim.true_state().effort[2] == pytest.approx(110.0)


# --------------------------------------------------------------------------------- motors


@pytest.mark.parametrize(("joint", "strength"), [(0, 0.5), (3, 0.3)])
def test_weakened_motor_caps_torque_and_accelerates_less(sim, q0, joint, strength):
    limit = sim.robot.effort_limits[joint]
    command = torque(joint, 1000.0)  # saturating for any strength
    weak_strength = [1.0] * N
    weak_strength[joint] = strength
    healthy = run(sim, q0, TaskParams(), command, 25)
    weak = run(sim, q0, TaskParams(motor_strength=tuple(weak_strength)), command, 25)
    assert healthy[-1].effort[joint] == limit
    assert weak[-1].effort[joint] == pytest.approx(strength * limit, rel=1e-12)
    moved_healthy = abs(healthy[-1].position[joint] - q0[joint])
    moved_weak = abs(weak[-1].position[joint] - q0[joint])
    assert moved_weak < 0.8 * moved_healthy


def test_weakened_motor_scales_an_unsaturated_command(sim, q0):
    # joint 1's axis is vertical, so its gravity term is ~0 and the effort is the command alone
    weak = run(sim, q0, TaskParams(motor_strength=(0.4,) + (1.0,) * 6), torque(0, 20.0), 1)
    assert weak[-1].effort[0] == pytest.approx(0.4 * 20.0, abs=1e-6)


# -------------------------------------------------------------------------------- friction


def test_coulomb_friction_holds_when_larger_and_slows_when_smaller(sim, q0):
    command = torque(0, 3.0)  # vertical axis: only the command and friction act on joint 1

    def moved(friction: float) -> float:
        task = TaskParams(coulomb_friction=(friction,) + (0.0,) * 6)
        return run(sim, q0, task, command, 100)[-1].position[0] - q0[0]

    assert abs(moved(5.0)) < 1e-9  # static friction holds exactly
    free, slowed = moved(0.0), moved(1.0)
    assert free > 0.05
    # net torque 2 N*m instead of 3: about 2/3 of the motion (measured 0.667)
    assert slowed / free == pytest.approx(2.0 / 3.0, abs=0.05)


def test_viscous_damping_slows_a_joint(sim, q0):
    free = run(sim, q0, TaskParams(), torque(0, 20.0), 100)[-1]
    damping = TaskParams(viscous_damping=(20.0,) + (0.0,) * 6)
    damped = run(sim, q0, damping, torque(0, 20.0), 100)[-1]
    assert 0.0 < damped.velocity[0] < 0.9 * free.velocity[0]


# ----------------------------------------------------------------------------------- delay


def test_actuator_delay_shifts_the_first_effect(sim, q0):
    command = torque(0, 20.0)  # a step at t = 0
    prompt = run(sim, q0, TaskParams(), command, 10)
    delayed = run(sim, q0, TaskParams(actuator_delay_s=0.01), command, 10)  # 5 physics steps
    prompt_effort = np.array([r.effort[0] for r in prompt])
    delayed_effort = np.array([r.effort[0] for r in delayed])
    delayed_motion = np.array([r.position[0] - q0[0] for r in delayed])
    np.testing.assert_allclose(prompt_effort, 20.0, atol=1e-6)
    np.testing.assert_allclose(delayed_effort[:5], 0.0, atol=1e-6)
    np.testing.assert_allclose(delayed_effort[5:], 20.0, atol=1e-6)
    assert np.abs(delayed_motion[:5]).max() < 1e-9  # no motion before the command arrives
    assert delayed_motion[5] > 1e-6
    assert prompt[0].position[0] - q0[0] > 1e-6


def test_delay_appearing_mid_run_holds_the_last_command(sim, q0):
    run(sim, q0, TaskParams(), torque(0, 20.0), 5)
    sim.set_task(TaskParams(actuator_delay_s=0.01))
    efforts = []
    for step in range(12):
        sim.step(torque(0, 20.0 if step < 3 else 40.0))
        efforts.append(sim.true_state().effort[0])
    # no zero-torque dropout when the delay appears; the change at step 3 arrives 5 steps later
    np.testing.assert_allclose(efforts[:8], 20.0, atol=1e-6)
    np.testing.assert_allclose(efforts[8:], 40.0, atol=1e-6)


# ----------------------------------------------------------------------------------- noise


def test_sensor_noise_has_the_task_std_and_zero_std_is_exact(sim, q0):
    sigma = 0.01
    run(sim, q0, TaskParams(sensor_noise_std=sigma), torque(0, 10.0), 5)
    truth = sim.true_state()
    readings = [sim.measure() for _ in range(300)]
    position_noise = np.array([r.position - truth.position for r in readings])
    velocity_noise = np.array([r.velocity - truth.velocity for r in readings])
    assert position_noise.std() == pytest.approx(sigma, rel=0.3)
    assert velocity_noise.std() == pytest.approx(10.0 * sigma, rel=0.3)
    assert abs(position_noise.mean()) < 0.2 * sigma
    np.testing.assert_array_equal(readings[0].effort, truth.effort)
    # the physics is untouched by measuring
    np.testing.assert_array_equal(sim.true_state().position, truth.position)

    run(sim, q0, TaskParams(sensor_noise_std=0.0), torque(0, 10.0), 5)
    exact, truth = sim.measure(), sim.true_state()
    np.testing.assert_array_equal(exact.position, truth.position)
    np.testing.assert_array_equal(exact.velocity, truth.velocity)


# ----------------------------------------------------------------------- scheduled faults


@pytest.mark.parametrize(
    ("fault_time", "expected_step"),
    # control step k (1-based) covers [(k-1)*0.01, k*0.01) s
    [(1.0, 101), (1.004, 101), (0.996, 100)],
)
def test_env_fault_strikes_in_the_control_step_containing_its_time(env, fault_time, expected_step):
    intact = nominal_task(N)
    lock = TaskParams(locked_joints=(2,))
    env.reset(seed=4, options={"faults": [FaultEvent(fault_time, lock, "lock j3")]})
    zero = np.zeros(N, dtype=np.float32)
    positions = []
    for step in range(1, expected_step + 4):
        _, _, _, _, info = env.step(zero)
        positions.append(env.sim.true_state().position[2])
        if step < expected_step:
            assert info["faults"] == [], f"fault reported early, at step {step}"
            assert env.true_task == intact, f"task changed early, at step {step}"
        elif step == expected_step:
            assert info["faults"] == ["lock j3"]
            assert env.true_task.locked_joints == (2,)
            assert info["task"] == env.true_task
            assert info["time_s"] == pytest.approx(expected_step * 0.01)
        else:
            assert info["faults"] == []
            assert env.true_task.locked_joints == (2,)
    # joint 3 moved before (the arm starts on the moving reference) and is held after
    assert abs(positions[expected_step - 2] - positions[0]) > 1e-3
    held = np.array(positions[expected_step - 1:])
    assert np.abs(held - held[0]).max() < 1e-3


def test_sim_fault_strikes_at_the_scheduled_physics_step(sim, q0):
    sim.reset(q0, np.zeros(N))
    dead = TaskParams(motor_strength=(0.0,) * N)
    event = FaultEvent(0.1, dead, "motors dead")  # 0.1 s = 50 physics steps at 500 Hz
    sim.schedule([event])
    command = torque(0, 20.0)
    for call in range(1, 53):
        applied = sim.step(command, substeps=1)
        effort = sim.true_state().effort[0]
        if call <= 50:
            assert applied == [] and sim.task.motor_strength == (1.0,) * N, call
            assert effort == pytest.approx(20.0, abs=1e-6)
        elif call == 51:  # the physics step starting at t = 0.1 s
            assert applied == [event]
            assert sim.task.motor_strength == (0.0,) * N
            assert effort == 0.0
        else:
            assert applied == [] and effort == 0.0


def test_lock_striking_mid_call_holds_the_joint_where_it_is(sim, q0):
    velocity = np.zeros(N)
    velocity[0] = 1.0
    sim.reset(q0, velocity)
    sim.schedule([FaultEvent(0.006, TaskParams(locked_joints=(0,)))])  # 3rd of 5 sub-steps
    sim.step(np.zeros(N), substeps=5)
    # it had moved ~0.006 rad when the brake engaged; it must not be pulled back to the start
    assert sim.true_state().position[0] - q0[0] == pytest.approx(0.006, abs=5e-4)


def test_schedule_rejects_past_and_invalid_events(sim, q0):
    sim.reset(q0, np.zeros(N))
    sim.step(np.zeros(N), substeps=10)
    with pytest.raises(ValueError, match="past"):
        sim.schedule([FaultEvent(0.001, TaskParams())])
    with pytest.raises(ValueError, match="locked joint index"):
        sim.schedule([FaultEvent(1.0, TaskParams(locked_joints=(9,)))])


# ---------------------------------------------------------------------------------- splits


def _outside_training(task: TaskParams, dist, friction_scale: np.ndarray) -> list[str]:
    """The parameters in which ``task`` lies outside distribution ``dist``."""
    reasons = []
    strength = np.asarray(task.motor_strength)
    if task.payload_mass > dist.payload_mass_kg.high:
        reasons.append("heavier payload")
    if (strength < dist.motor_strength.low).any():
        reasons.append("weaker motor")
    if set(np.flatnonzero(strength < 1.0)) - set(dist.damageable_joints):
        reasons.append("untrained joint damaged")
    if set(task.locked_joints) - set(dist.lockable_joints):
        reasons.append("untrained joint locked")
    if np.abs(task.payload_offset).max() > dist.payload_offset_m.high:
        reasons.append("payload offset")
    if (np.asarray(task.coulomb_friction) > dist.coulomb_friction_nm.high * friction_scale).any():
        reasons.append("friction")
    if (np.asarray(task.viscous_damping) > dist.viscous_damping_nms.high * friction_scale).any():
        reasons.append("damping")
    if task.sensor_noise_std > dist.sensor_noise_std.high:
        reasons.append("noise")
    if task.actuator_delay_s > dist.actuator_delay_s.high:
        reasons.append("delay")
    return reasons


@pytest.fixture(scope="module")
def splits(setup):
    scale = setup.robot.friction_scale
    return {name: make_split(setup.tasks, name, scale) for name in ("train", "heldout", "ood")}


def test_splits_are_reproducible_and_sized(setup, splits):
    for name, tasks in splits.items():
        again = make_split(setup.tasks, name, setup.robot.friction_scale)
        assert [t.key() for t in again] == [t.key() for t in tasks]
        assert len(tasks) == setup.tasks.splits[name].num_tasks
        assert len({t.key() for t in tasks}) == len(tasks)
        for task in tasks:
            task.validate(N)


def test_train_starts_with_nominal_and_is_disjoint_from_heldout(splits):
    assert splits["train"][0] == nominal_task(N)
    assert splits["train"][0].key() == TaskParams().normalized(N).key()
    assert not {t.key() for t in splits["train"]} & {t.key() for t in splits["heldout"]}


def test_heldout_inside_and_every_ood_task_outside_training_ranges(setup, splits):
    train_dist = setup.tasks.distributions[setup.tasks.splits["train"].distribution]
    scale = np.asarray(setup.robot.friction_scale)
    for task in splits["heldout"]:
        assert _outside_training(task, train_dist, scale) == []
    hard = {"heavier payload", "weaker motor", "untrained joint damaged", "untrained joint locked"}
    hard_count = 0
    for i, task in enumerate(splits["ood"]):
        reasons = _outside_training(task, train_dist, scale)
        assert reasons, f"ood task {i} lies inside the training ranges: {task}"
        hard_count += bool(hard & set(reasons))
    # most ood tasks carry a fault beyond training (shipped YAML: 28 of 30; the other two
    # are out of range only in friction/damping/delay)
    assert hard_count >= 0.8 * len(splits["ood"])


# ------------------------------------------------------------------------------- reference


def _references(setup, config: ReferenceConfig, count: int):
    robot = setup.robot
    rng = np.random.default_rng(0)
    return [
        MultiSineReference.sample(
            config, np.asarray(robot.default_pose), np.asarray(robot.position_lower),
            np.asarray(robot.position_upper), rng,
        )
        for _ in range(count)
    ]


def test_reference_derivatives_match_finite_differences(setup):
    h = 1e-5
    for ref in _references(setup, setup.config.reference, 5):
        for t in (0.0, 0.37, 1.5, 3.99):
            q, qd, qdd = ref.evaluate(t)
            (q_minus, qd_minus, _), (q_plus, qd_plus, _) = ref.evaluate(t - h), ref.evaluate(t + h)
            np.testing.assert_allclose((q_plus - q_minus) / (2 * h), qd, atol=1e-6)
            np.testing.assert_allclose((qd_plus - qd_minus) / (2 * h), qdd, atol=1e-6)
            assert np.abs(qd).max() > 0  # it does move


@pytest.mark.parametrize("jitter", ["shipped", "huge"])
def test_reference_stays_within_joint_limits(setup, jitter):
    config = setup.config.reference
    if jitter == "huge":  # centres drawn far outside the limits must be pulled back in
        config = config.model_copy(update={"centre_jitter": [5.0] * N})
    lower, upper = np.asarray(setup.robot.position_lower), np.asarray(setup.robot.position_upper)
    times = np.linspace(0.0, 10.0, 1001)
    for ref in _references(setup, config, 25):
        q = np.array([ref.evaluate(t)[0] for t in times])
        assert (q > lower).all() and (q < upper).all()


# ------------------------------------------------------------------------------- gymnasium


def test_gymnasium_make_and_env_checker():
    assert metarl_ros.ENV_ID == "metarl_ros/ArmTracking-v0"
    env = gymnasium.make("metarl_ros/ArmTracking-v0")
    try:
        assert isinstance(env.unwrapped, ArmTrackingEnv)
        with warnings.catch_warnings():
            # the observation is unbounded by design (velocities, errors)
            warnings.filterwarnings("ignore", message=".*Box observation space (min|max)imum")
            check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()


def test_episode_truncates_after_400_steps(env):
    obs, info = env.reset(seed=0)
    # seven blocks of n, plus the model features of the compliant env
    assert obs.shape == ((7 + 13) * N,) and obs.dtype == np.float32
    assert info["faults"] == [] and info["time_s"] == 0.0
    action = np.zeros(N, dtype=np.float32)
    for step in range(1, 401):
        obs, reward, terminated, truncated, info = env.step(action)
        assert not terminated
        assert truncated == (step == 400), step
        assert env.observation_space.contains(obs)
        assert math.isfinite(reward)
    assert info["time_s"] == pytest.approx(4.0)
