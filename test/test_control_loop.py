"""The ROS-free control loop: mapping, watchdog, clamp, safe action, transitions, diagnostics."""

import math
from dataclasses import replace

import numpy as np
import pytest

from metarl_ros.control.controller import AdaptiveController
from metarl_ros.control.joint_map import JointNameMapper, RejectedInput
from metarl_ros.control.law import build_observation, effort_command, tracking_reward
from metarl_ros.control.loop_types import LoopConfig
from metarl_ros.control.measured import MeasuredObservation
from metarl_ros.control.policy_interface import PosteriorSummary
from metarl_ros.control.safety import EffortClamp, SafeAction
from metarl_ros.control.watchdog import Watchdog
from metarl_ros.core.log import LogThrottle
from metarl_ros.policy.factory import make_policy, setup_contract
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup

NAMES = ["a", "b", "c"]


class RecordingPolicy:
    """Implements AdaptivePolicy; records calls; optional failures and latent."""

    def __init__(self, setup, action=None, fail_on=(), bad_output_on=(), latent=None):
        self.contract = setup_contract(setup)
        self.n = setup.act_dim
        self.action = np.zeros(self.n) if action is None else np.asarray(action, float)
        self.fail_on = set(fail_on)
        self.bad_output_on = set(bad_output_on)
        self.calls = 0
        self.observed = []
        self.latent = latent

    def reset(self):
        self.observed.clear()

    def observe(self, obs, action, reward, next_obs):
        self.observed.append((obs.copy(), action.copy(), reward, next_obs.copy()))

    def act(self, obs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"boom {self.calls}")
        if self.calls in self.bad_output_on:
            return np.full(self.n, np.nan)
        return self.action.copy()

    def posterior(self):
        if self.latent is None:
            return PosteriorSummary(np.zeros(0), np.zeros(0), 0)
        mean, std = self.latent
        return PosteriorSummary(np.asarray(mean, float), np.asarray(std, float), 7)


def _feed(loop, t, q, qd=None, ref=None, names=None):
    """Give the loop a reference then a joint state at time t; tick if due."""
    n = loop.n
    names = list(loop.joints.joint_names) if names is None else names
    qd = np.zeros(n) if qd is None else qd
    ref = (q, np.zeros(n), np.zeros(n)) if ref is None else ref
    loop.on_reference(t, t, [], *ref)
    if loop.on_joint_state(t, t, names, q, qd):
        return loop.tick(t)
    return None


# ---------------------------------------------------------------------------- mapping


def test_mapper_by_name_any_order_extra_joints_ignored():
    mapper = JointNameMapper(NAMES)
    sample = mapper.map(["x", "c", "a", "b"], [9.0, 3.0, 1.0, 2.0], [90.0, 30.0, 10.0, 20.0])
    np.testing.assert_array_equal(sample.position, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(sample.velocity, [10.0, 20.0, 30.0])
    assert sample.effort is None


def test_mapper_nan_on_extra_joint_is_fine_but_not_on_a_controlled_one():
    mapper = JointNameMapper(NAMES)
    mapper.map(["a", "b", "c", "x"], [1, 2, 3, math.nan], [0, 0, 0, 0])
    with pytest.raises(RejectedInput) as info:
        mapper.map(["a", "b", "c"], [1, math.nan, 3], [0, 0, 0])
    assert info.value.reason == "non_finite"
    with pytest.raises(RejectedInput):
        mapper.map(["a", "b", "c"], [1, 2, 3], [0, math.inf, 0])


@pytest.mark.parametrize("names,pos,vel,reason", [
    (["a", "b"], [1, 2], [0, 0], "missing_joints"),
    (["a", "b", "c"], [1, 2], [0, 0, 0], "length_mismatch"),
    (["a", "b", "c"], [1, 2, 3], [0, 0], "length_mismatch"),
    (["a", "b", "c"], [1, 2, 3], [], "length_mismatch"),
    (["a", "a", "c"], [1, 2, 3], [0, 0, 0], "duplicate_names"),
    ([], [1, 2, 3], [0, 0, 0], "no_names"),
])
def test_mapper_rejections(names, pos, vel, reason):
    with pytest.raises(RejectedInput) as info:
        JointNameMapper(NAMES).map(names, pos, vel)
    assert info.value.reason == reason


def test_mapper_unnamed_allowed_for_references():
    mapper = JointNameMapper(NAMES, allow_unnamed=True)
    sample = mapper.map([], [1, 2, 3], [4, 5, 6], [7, 8, 9], require_effort=True)
    np.testing.assert_array_equal(sample.effort, [7, 8, 9])
    with pytest.raises(RejectedInput):
        mapper.map([], [1, 2, 3], [4, 5, 6], [], require_effort=True)


def test_mapper_cache_follows_order_changes():
    mapper = JointNameMapper(NAMES)
    assert mapper.map(["a", "b", "c"], [1, 2, 3], [0, 0, 0]).position.tolist() == [1, 2, 3]
    assert mapper.map(["c", "b", "a"], [1, 2, 3], [0, 0, 0]).position.tolist() == [3, 2, 1]


# ---------------------------------------------------------------------------- pieces


def test_watchdog():
    dog = Watchdog(0.1)
    assert dog.age(5.0) == math.inf and dog.stale(5.0)
    dog.feed(1.0)
    assert dog.age(1.05) == pytest.approx(0.05) and not dog.stale(1.05)
    assert dog.stale(1.2)
    with pytest.raises(ValueError):
        Watchdog(0.0)
    waiting = Watchdog(0.1)
    waiting.arm(2.0)  # expected from now on: a missing input ages from here
    assert waiting.age(2.05) == pytest.approx(0.05) and not waiting.stale(2.05)
    assert waiting.stale(2.11)
    waiting.arm(3.0)  # arming again does not restart the count
    assert waiting.stale(2.11)
    dog.arm(9.0)  # nor does arming a watchdog that has been fed
    assert dog.age(1.05) == pytest.approx(0.05)


def test_effort_clamp():
    clamp = EffortClamp([10.0, 20.0], [15.0, 5.0])
    np.testing.assert_allclose(clamp.check_action(np.array([2.0, -0.5])), [1.0, -0.5])
    np.testing.assert_allclose(clamp.clamp(np.array([10.0, -10.0])), [10.0, -5.0])
    np.testing.assert_allclose(clamp.clamp(np.array([np.nan, -100.0])), [0.0, -5.0])
    with pytest.raises(ValueError):
        clamp.check_action(np.array([np.nan, 0.0]))
    with pytest.raises(ValueError):
        clamp.check_action(np.zeros(3))


def test_safe_action_zero_and_hold():
    from metarl_ros.control.joint_map import JointSample

    clamp = EffortClamp([10.0, 10.0], [50.0, 50.0])
    zero = SafeAction("zero", [1, 1], [1, 1], clamp)
    sample = JointSample(np.array([0.1, 0.2]), np.array([1.0, 0.0]))
    assert zero.efforts(sample).tolist() == [0.0, 0.0]
    hold = SafeAction("hold", [100.0, 100.0], [10.0, 10.0], clamp)
    hold.latch(np.array([0.0, 0.0]))
    np.testing.assert_allclose(hold.efforts(sample), [-10.0 - 10.0, -20.0])
    big = JointSample(np.array([10.0, -10.0]), np.zeros(2))
    np.testing.assert_allclose(hold.efforts(big), [-50.0, 50.0])  # clamped
    with pytest.raises(ValueError):
        SafeAction("brake", [1, 1], [1, 1], clamp)


def test_log_throttle_counts_suppressed():
    now = [0.0]
    throttle = LogThrottle(1.0, clock=lambda: now[0])
    assert throttle.ready("x") == 0
    assert throttle.ready("x") is None
    assert throttle.ready("y") == 0
    now[0] = 0.5
    assert throttle.ready("x") is None
    now[0] = 1.01
    assert throttle.ready("x") == 2


# ---------------------------------------------------------------------------- controller


def test_transitions_observation_and_reward_match_the_env(setup):
    """Fed the env's readings, the loop builds the env's observations, efforts and rewards."""
    env = ArmTrackingEnv(setup)
    rng = np.random.default_rng(1)
    recorder = RecordingPolicy(setup)
    loop = AdaptiveController(setup.law, recorder, LoopConfig(control_rate_hz=100.0))
    obs, _ = env.reset(seed=3)
    env_transitions = []
    for k in range(6):
        t = env.sim.time_s
        reading = env.sim.measure()
        ref = env.reference_at(t)
        recorder.action = rng.uniform(-0.3, 0.3, 7)
        loop.on_reference(t, t, [], *ref)
        assert loop.on_joint_state(t, t, setup.robot.joint_names, reading.position,
                                   reading.velocity)
        result = loop.tick(t)
        assert not result.safe
        expected = effort_command(setup.law, recorder.action, reading.position,
                                  reading.velocity, ref)
        np.testing.assert_allclose(result.efforts, expected)
        next_obs, reward, *_ = env.step(result.action.astype(np.float32))
        env_transitions.append((obs, result.action, reward, next_obs))
        obs = next_obs
    assert len(recorder.observed) == 5  # the last transition ends at the next tick
    for (o, a, r, o2), (eo, ea, er, eo2) in zip(recorder.observed, env_transitions):
        np.testing.assert_allclose(o, eo, atol=1e-6)
        np.testing.assert_allclose(a, ea, atol=1e-6)
        np.testing.assert_allclose(o2, eo2, atol=1e-6)
        assert r == pytest.approx(er, abs=1e-9)
    env.close()


def test_decimation_to_the_control_rate(setup):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig(control_rate_hz=100.0))
    q = np.asarray(setup.robot.default_pose)
    ticks = [k for k in range(50) if _feed(loop, 1.0 + k * 0.002, q) is not None]
    assert ticks == list(range(0, 50, 5))


def test_reference_sync_defers_the_tick_until_the_matching_reference(setup):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    zeros = np.zeros(7)
    names = setup.robot.joint_names
    assert not loop.on_joint_state(1.0, 1.0, names, q, zeros)  # no reference yet
    assert loop.on_reference(1.0, 1.0, names, q, zeros, zeros)
    loop.tick(1.0)
    assert not loop.on_joint_state(1.01, 1.01, names, q, zeros)  # reference is older
    assert loop.on_reference(1.01, 1.01, [], q, zeros, zeros)
    unsynced = AdaptiveController(setup.law, RecordingPolicy(setup),
                                  LoopConfig(reference_sync=False))
    unsynced.on_reference(1.0, 1.0, [], q, zeros, zeros)
    assert unsynced.on_joint_state(1.01, 1.01, names, q, zeros)


def test_policy_exception_gives_safe_action_and_the_loop_continues(setup):
    policy = RecordingPolicy(setup, action=np.full(7, 0.5), fail_on={3}, bad_output_on={5})
    loop = AdaptiveController(setup.law, policy, LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    results = [_feed(loop, 1.0 + 0.01 * k, q) for k in range(8)]
    assert [r.safe for r in results] == [False, False, True, False, True, False, False, False]
    assert results[2].reason == "policy_error" and "boom 3" in results[2].error
    assert results[2].efforts.tolist() == [0.0] * 7
    assert loop.stats.policy_errors == 2
    # a transition needs the policy's own action at its start: 0-1, 1-2, 3-4, 5-6, 6-7
    # (observe runs before act, so 1-2 and 3-4 are handed over before act fails)
    assert len(policy.observed) == 5
    report = loop.diagnostics(2.0)
    assert report.level == "warn" and report.values["policy_errors"] == "2"


def test_policy_action_is_clipped_and_efforts_clamped(setup):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup, action=np.full(7, 5.0)),
                              LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    zeros = np.zeros(7)
    result = _feed(loop, 1.0, q)  # on the reference: no feedback term
    np.testing.assert_allclose(result.action, np.ones(7))
    np.testing.assert_allclose(result.efforts, setup.robot.action_scale)
    far = (q + 2.0, zeros, zeros)  # huge error: the PD term would exceed the limits
    result = _feed(loop, 1.01, q, ref=far)
    np.testing.assert_allclose(np.abs(result.efforts), setup.robot.effort_limits)


def test_pd_policy_is_the_env_controller_with_zero_action(setup, model):
    """``pd`` adds nothing to the env's control law: on the default (compliant) env that is
    the PD plus the nominal arm's inverse dynamics along the reference (no gravity: the
    firmware adds it); on the tracking env, whose law has no feed-forward, the PD alone."""
    assert setup.config.feed_forward == "nominal_model"
    q = np.asarray(setup.robot.default_pose)
    ref = (q + 0.01, np.full(7, 0.1), np.full(7, 0.5))
    pd = (np.asarray(setup.config.feedback.kp) * 0.01
          + np.asarray(setup.config.feedback.kd) * 0.1)
    feed_forward = model.inverse_dynamics(*ref) - model.gravity(ref[0])
    assert np.max(np.abs(feed_forward)) > 0.1  # N*m: the check can tell the two apart
    result = _feed(AdaptiveController(setup.law, make_policy("pd", setup), LoopConfig()),
                   1.0, q, ref=ref)
    assert (result.action == 0).all()
    np.testing.assert_allclose(result.efforts, pd + feed_forward, rtol=1e-9, atol=1e-9)

    tracking = load_env_setup("sim/envs/iiwa7_tracking.yaml")
    assert tracking.config.feed_forward == "none"
    result = _feed(AdaptiveController(tracking.law, make_policy("pd", tracking), LoopConfig()),
                   1.0, q, ref=ref)
    assert (result.action == 0).all()
    np.testing.assert_allclose(result.efforts, np.asarray(tracking.config.feedback.kp) * 0.01
                               + np.asarray(tracking.config.feedback.kd) * 0.1)


def test_stale_sensors_watchdog_commands_safe_action_once_per_period(setup):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup, action=np.full(7, 0.3)),
                              LoopConfig(watchdog_timeout_s=0.1, safe_mode="hold",
                                         hold_kp=(100.0,) * 7, hold_kd=(0.0,) * 7))
    assert loop.watchdog(0.5) is None  # nothing ever received: not started
    q = np.asarray(setup.robot.default_pose)
    assert not _feed(loop, 1.0, q).safe
    assert loop.watchdog(1.05) is None
    first = loop.watchdog(1.2)
    assert first is not None and first.safe and first.reason == "sensor_stale"
    np.testing.assert_allclose(first.efforts, 0.0)  # hold where it was: no error yet
    assert loop.watchdog(1.204) is None  # once per control period
    assert loop.watchdog(1.211) is not None
    assert loop.diagnostics(1.3).level == "error"
    assert loop.stats.stale_events == 1
    # fresh data: the policy is back
    assert not _feed(loop, 1.3, q).safe
    assert loop.safe_reason == "" and loop.diagnostics(1.3).level == "ok"


def test_missing_input_is_stale_only_a_timeout_after_the_other_arrived(setup):
    """At start-up a joint state may come a little before its reference (or the other way
    round): that is no reason for the safe action, which would race the first real command
    (and, untagged, answer a lockstep simulator's instant). The missing input goes stale
    once it has been missing for the watchdog timeout."""
    q = np.asarray(setup.robot.default_pose)
    zeros = np.zeros(7)
    names = setup.robot.joint_names
    config = LoopConfig(watchdog_timeout_s=0.1)
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), config)
    assert not loop.on_joint_state(1.0, 1.0, names, q, zeros)  # waits for its reference
    assert loop.watchdog(1.0) is None and loop.watchdog(1.09) is None
    assert loop.on_reference(1.0, 1.095, names, q, zeros, zeros)
    assert not loop.tick(1.095).safe
    never = AdaptiveController(setup.law, RecordingPolicy(setup), config)
    never.on_joint_state(1.0, 1.0, names, q, zeros)
    never.on_joint_state(1.06, 1.06, names, q, zeros)  # joint states keep coming
    stale = never.watchdog(1.11)
    assert stale is not None and stale.safe and stale.reason == "reference_stale"
    only_reference = AdaptiveController(setup.law, RecordingPolicy(setup), config)
    assert not only_reference.on_reference(1.0, 1.0, [], q, zeros, zeros)
    assert only_reference.watchdog(1.05) is None
    only_reference.on_reference(1.06, 1.06, [], q, zeros, zeros)
    assert only_reference.watchdog(1.11).reason == "sensor_stale"


def test_hold_mode_holds_the_latched_position_through_policy_failure(setup):
    policy = RecordingPolicy(setup, fail_on={2, 3})
    loop = AdaptiveController(setup.law, policy, LoopConfig(safe_mode="hold", hold_kp=(100.0,) * 7,
                                                        hold_kd=(10.0,) * 7))
    q = np.asarray(setup.robot.default_pose)
    _feed(loop, 1.0, q)
    assert _feed(loop, 1.01, q).safe  # latched at q
    moved = q + 0.01
    result = _feed(loop, 1.02, moved, qd=np.full(7, 0.1))
    np.testing.assert_allclose(result.efforts, 100.0 * -0.01 - 10.0 * 0.1)


def test_context_update_latent_shift_and_adaptation_events(setup):
    policy = RecordingPolicy(setup, latent=(np.zeros(4), np.full(4, 0.1)))
    loop = AdaptiveController(setup.law, policy, LoopConfig(adaptation_event_threshold=1.0))
    first = loop.update_context(0.1)
    assert first.shift == 0.0 and not first.adaptation_event and first.window_fill == 7
    policy.latent = (np.full(4, 0.05), np.full(4, 0.1))  # 0.5 std: no event
    assert not loop.update_context(0.2).adaptation_event
    policy.latent = (np.full(4, 0.3), np.full(4, 0.1))  # 3 std: event
    update = loop.update_context(0.3)
    assert update.adaptation_event and update.shift == pytest.approx(0.5)
    assert loop.stats.adaptation_events == 1
    values = loop.diagnostics(0.3).values
    assert values["latent_dim"] == "4" and values["adaptation_events"] == "1"
    no_latent = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    assert no_latent.update_context(0) is None


def test_rejections_are_counted_and_keep_the_previous_sample(setup):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    _feed(loop, 1.0, q)
    with pytest.raises(RejectedInput):
        loop.on_joint_state(1.01, 1.01, setup.robot.joint_names, [math.nan] * 7, [0.0] * 7)
    with pytest.raises(RejectedInput):
        loop.on_reference(1.01, 1.01, [], [0.0] * 6, [0.0] * 6, [0.0] * 6)
    values = loop.diagnostics(1.02).values
    assert values["rejected_joint_states"] == "1" and values["rejected_references"] == "1"
    assert values["rejected.joint_state:non_finite"] == "1"
    assert not loop.watchdog(1.05)  # the rejected message did not feed the watchdog...
    assert loop.watchdog(1.2).reason == "sensor_stale"  # ...so it goes stale


def test_late_ticks_from_gaps_and_publish_latency(setup):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup),
                              LoopConfig(late_tick_fraction=0.5))
    q = np.asarray(setup.robot.default_pose)
    _feed(loop, 1.0, q)
    _feed(loop, 1.01, q)
    loop.record_publish_latency(0.001)
    assert loop.stats.late_ticks == 0
    _feed(loop, 1.05, q)  # 4 periods later
    assert loop.stats.late_ticks == 1
    loop.record_publish_latency(0.2)  # same tick: counted once
    assert loop.stats.late_ticks == 1
    _feed(loop, 1.06, q)
    loop.record_publish_latency(0.006)
    assert loop.stats.late_ticks == 2


def test_reward_uses_the_shared_function(setup):
    """Guard against re-implementation: the reward equals tracking_reward's for a known error."""
    policy = RecordingPolicy(setup, action=np.full(7, 0.2))
    loop = AdaptiveController(setup.law, policy, LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    ref_q = q + 0.01
    zeros = np.zeros(7)
    _feed(loop, 1.0, q, ref=(ref_q, zeros, zeros))
    _feed(loop, 1.01, q, ref=(ref_q, zeros, zeros))
    expected = tracking_reward(setup.law, float(np.linalg.norm(ref_q - q)), np.full(7, 0.2))
    assert policy.observed[0][2] == pytest.approx(expected)


def test_repeated_instant_is_answered_again_without_calling_the_policy(setup):
    policy = RecordingPolicy(setup, action=np.full(7, 0.1))
    loop = AdaptiveController(setup.law, policy, LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    first = _feed(loop, 0.0 + 1e-9, q)
    again = _feed(loop, 0.0 + 1e-9, q)
    assert again is first and policy.calls == 1 and loop.stats.ticks == 1
    assert _feed(loop, 0.01, q) is not first and policy.calls == 2


# ---------------------------------------------------------------------------- bad stamps, clocks


def _names(setup):
    return list(setup.robot.joint_names)


def test_one_joint_state_stamped_in_the_future_does_not_silence_the_loop(setup):
    """A single joint state stamped +5 s (and, within the offset limit, +0.5 s) must not move
    the tick grid so that every good message after it is decimated in silence."""
    policy = RecordingPolicy(setup, action=np.full(7, 0.1))
    loop = AdaptiveController(setup.law, policy, LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    zeros = np.zeros(7)
    assert not _feed(loop, 1.0, q).safe
    with pytest.raises(RejectedInput) as info:
        loop.on_joint_state(6.01, 1.01, _names(setup), q, zeros)
    assert info.value.reason == "stamp_offset" and "5 s ahead" in str(info.value)
    results = [_feed(loop, 1.01 + 0.01 * k, q) for k in range(10)]
    assert all(r is not None and not r.safe for r in results)
    # +0.5 s is inside max_stamp_offset: accepted, yet the loop resynchronises on the next
    # good messages instead of waiting half a second for the grid (reference_sync holds it)
    loop.on_reference(1.11, 1.11, [], q, zeros, zeros)
    assert not loop.on_joint_state(1.61, 1.11, _names(setup), q, zeros)  # no reference yet
    ticks = [_feed(loop, 1.12 + 0.01 * k, q) for k in range(5)]
    assert sum(r is not None for r in ticks) >= 4 and not any(r.safe for r in ticks if r)
    assert loop.stats.stamp_jumps >= 1
    assert "resynchronised" in loop.diagnostics(1.2).values["last_stamp_jump"]


def test_stamps_that_go_back_resynchronise_the_loop(setup):
    """A simulator reset (stamps and clock back to 0): ticks go on at once."""
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    for k in range(5):
        _feed(loop, 5.0 + 0.01 * k, q)
    results = [_feed(loop, 0.01 + 0.01 * k, q) for k in range(5)]
    assert all(r is not None and not r.safe for r in results)
    assert loop.stats.stamp_jumps == 1 and "went back" in loop.stats.last_stamp_jump


def test_stamps_far_from_the_clock_give_the_safe_action_and_say_why(setup):
    """All joint states stamped 100 s in the past: none is used, the watchdog commands the safe
    action every period, and diagnostics say the stamps are the reason (not just stale)."""
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    zeros = np.zeros(7)
    commands = []
    for k in range(30):
        now = 200.0 + 0.01 * k
        loop.on_reference(now, now, [], q, zeros, zeros)
        with pytest.raises(RejectedInput):
            loop.on_joint_state(now - 100.0, now, _names(setup), q, zeros)
        commands.append(loop.watchdog(now))
    safe = [c for c in commands if c is not None]
    assert safe and all(c.safe and c.reason == "stamp_offset" for c in safe)
    assert len(safe) >= 19  # from the watchdog timeout on, every control period
    assert "100 s behind" in safe[-1].detail
    report = loop.diagnostics(200.3)
    assert report.level == "error" and report.values["state"] == "stamp_offset"
    assert "stamp" in report.message and "100 s behind" in report.message


@pytest.mark.parametrize("stamp,now,hint", [
    (12.0, 1.8e9, "start it with use_sim_time:=true"),
    (1.8e9, 12.0, "runs on simulated time (use_sim_time:=true)"),
    (1.8e9, 0.0, "no /clock has arrived"),
])
def test_a_use_sim_time_mismatch_is_named(setup, stamp, now, hint):
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    with pytest.raises(RejectedInput) as info:
        loop.on_joint_state(stamp, now, _names(setup), q, np.zeros(7))
    assert hint in str(info.value)
    result = loop.watchdog(now + 0.2)
    assert result is not None and result.safe and hint in result.detail


def test_a_reference_stamped_behind_does_not_hold_the_tick_forever(setup):
    """reference_sync waits for a reference stamped no earlier than the joint state; one that
    lags by 0.5 s never comes: after the watchdog timeout the safe action goes out, named."""
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    q = np.asarray(setup.robot.default_pose)
    zeros = np.zeros(7)
    results = []
    for k in range(30):
        now = 2.0 + 0.01 * k
        loop.on_reference(now - 0.5, now, [], q, zeros, zeros)
        assert not loop.on_joint_state(now, now, _names(setup), q, zeros)
        results.append(loop.watchdog(now))
    safe = [r for r in results if r is not None]
    assert safe and all(r.reason == "reference_behind" for r in safe)
    assert "0.500 s behind" in safe[0].detail


def test_a_paused_clock_is_reported_idle_not_policy_in_control(setup):
    wall = [0.0]
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig(idle_after_s=1.0),
                              wall_clock=lambda: wall[0])
    q = np.asarray(setup.robot.default_pose)
    for k in range(5):
        wall[0] += 0.01
        _feed(loop, 1.0 + 0.01 * k, q)
    assert loop.diagnostics(1.04).message == "policy in control"
    wall[0] += 5.0  # the simulation pauses: its clock, and the inputs, stand still
    assert loop.watchdog(1.04) is None  # nothing is stale on a clock that does not move
    report = loop.diagnostics(1.04)
    assert report.values["state"] == "idle" and report.level == "warn"
    assert "paused" in report.message and "policy in control" not in report.message
    wall[0] += 0.01
    assert not _feed(loop, 1.05, q).safe  # it resumes
    assert loop.diagnostics(1.05).message == "policy in control"


def test_before_any_input_diagnostics_say_waiting(setup):
    wall = [0.0]
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig(),
                              wall_clock=lambda: wall[0])
    wall[0] = 3.0
    report = loop.diagnostics(3.0)
    assert report.values["state"] == "idle" and "waiting for joint states" in report.message


def test_stale_watchdog_publishes_at_the_control_rate_despite_timer_jitter(setup):
    """A timer polling once per period, each poll a little early or late: one safe command per
    poll (the control rate), not every other poll."""
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig(control_rate_hz=100.0))
    q = np.asarray(setup.robot.default_pose)
    _feed(loop, 1.0, q)
    jitter = [0.002, -0.002, 0.001, -0.0015, 0.0024, -0.0024]
    polls = [1.2 + 0.01 * k + jitter[k % len(jitter)] for k in range(100)]
    sent = [loop.watchdog(t) for t in polls]
    assert sum(r is not None for r in sent) == len(polls)
    assert loop.watchdog(polls[-1] + 0.004) is None  # yet never twice in half a period


def test_a_huge_joint_state_is_rejected_before_any_per_joint_work(setup):
    """1e6 joints: refused on its length alone (iterating it would block the loop)."""

    class Huge:
        def __len__(self):
            return 1_000_000

        def __iter__(self):
            raise AssertionError("iterated a huge message")

        __getitem__ = __iter__
        __array__ = __iter__

    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    for call in (lambda: loop.on_joint_state(1.0, 1.0, Huge(), Huge(), Huge()),
                 lambda: loop.on_reference(1.0, 1.0, Huge(), Huge(), Huge(), Huge())):
        with pytest.raises(RejectedInput) as info:
            call()
        assert info.value.reason == "too_many_entries" and "1000000 entries" in str(info.value)


def test_adaptation_event_reports_the_compared_quantity(setup):
    policy = RecordingPolicy(setup, latent=(np.zeros(4), np.full(4, 0.1)))
    loop = AdaptiveController(setup.law, policy, LoopConfig(adaptation_event_threshold=1.0))
    loop.update_context(0.1)
    policy.latent = (np.full(4, 0.3), np.full(4, 0.1))
    update = loop.update_context(0.2)
    assert update.adaptation_event
    assert update.moved == pytest.approx(3.0)  # RMS of (mean - reference) / std: compared
    assert update.shift == pytest.approx(0.6)  # the Euclidean step in latent units: not
    assert loop.diagnostics(0.2).values["latent_moved_std"] == "3.000"


def test_effort_limit_scale_and_safe_mode_change_live(setup):
    policy = RecordingPolicy(setup, action=np.full(7, 1.0))
    loop = AdaptiveController(setup.law, policy, LoopConfig(hold_kp=(100.0,) * 7,
                                                            hold_kd=(0.0,) * 7))
    q = np.asarray(setup.robot.default_pose)
    full = _feed(loop, 1.0, q).efforts
    loop.set_effort_limit_scale(0.1)
    limited = _feed(loop, 1.01, q).efforts
    np.testing.assert_allclose(np.abs(limited),
                               np.minimum(np.abs(full), 0.1 * np.asarray(setup.law.effort_limits)))
    assert loop.diagnostics(1.01).values["safe_mode"] == "zero"
    with pytest.raises(ValueError):
        loop.set_effort_limit_scale(1.5)
    with pytest.raises(ValueError):
        loop.set_safe_mode("bogus")
    assert loop.config.effort_limit_scale == 0.1 and loop.config.safe_mode == "zero"
    loop.set_safe_mode("hold")
    stale = loop.watchdog(1.2)
    assert stale.safe and loop.safe.mode == "hold"
    assert loop.diagnostics(1.2).values["safe_mode"] == "hold"


def test_reference_view_is_the_observation_on_the_reference():
    """The feed-forward view of an observation equals the observation built with the robot
    exactly on its reference (q = q_ref, qd = qd_ref)."""
    from metarl_ros.control.law import reference_view_matrix

    setup = load_env_setup()
    law = setup.law
    rng = np.random.default_rng(0)
    q, qd = rng.normal(size=7), rng.normal(size=7)
    ref = (rng.normal(size=7), rng.normal(size=7), rng.normal(size=7))
    previous = rng.uniform(-1, 1, 7).astype(np.float32)
    measured = build_observation(law, q, qd, ref, previous)
    on_reference = build_observation(law, ref[0], ref[1], ref, previous)
    view = reference_view_matrix(law)
    np.testing.assert_allclose(view @ measured, on_reference, atol=1e-5)
    assert not np.allclose(measured, on_reference)


def test_reference_terms_run_once_per_tick_when_its_reference_arrives(setup):
    """The rigid-body model's part of the law (model features and feed-forward) runs once per
    control tick, when the reference that tick uses arrives -- not for decimated references,
    not again after the joint state -- and the tick's observation and efforts are those of the
    law computed inline."""
    calls = []
    phase = {"now": ""}

    def counted(name, fn):
        def wrapped(*args):
            calls.append((name, phase["now"]))
            return fn(*args)
        return wrapped

    n = setup.act_dim
    law = replace(setup.law,
                  model_features=counted("features", lambda q, qd, qdd: np.concatenate(
                      [q, qd, qdd]).astype(np.float32)),
                  feed_forward=counted("feed_forward", lambda q, qd, qdd: 2.0 * q + qdd))
    recorder = RecordingPolicy(setup, action=np.full(n, 0.1))
    loop = AdaptiveController(law, recorder, LoopConfig(control_rate_hz=100.0))
    rng = np.random.default_rng(0)
    results, inline = [], []
    for k in range(25):  # 500 Hz: a tick at every fifth instant
        t = 1.0 + 0.002 * k
        ref = tuple(rng.normal(size=n) for _ in range(3))
        q, qd = rng.normal(size=n), rng.normal(size=n)
        phase["now"] = "reference"
        loop.on_reference(t, t, [], *ref)
        phase["now"] = "joint_state"
        if loop.on_joint_state(t, t, setup.robot.joint_names, q, qd):
            phase["now"] = "tick"
            results.append(loop.tick(t))
            phase["now"] = "inline"
            inline.append((loop.clamp.clamp(effort_command(law, recorder.action, q, qd, ref)),
                           build_observation(law, q, qd, ref, np.full(n, 0.1, np.float32))))
    assert len(results) == 5
    during_loop = [c for c in calls if c[1] != "inline"]
    assert during_loop == [("features", "reference"), ("feed_forward", "reference")] * 5
    for result, (efforts, _) in zip(results, inline):
        np.testing.assert_array_equal(result.efforts, efforts)
    for (obs, *_), (_, expected) in zip(recorder.observed[1:], inline[1:-1]):
        np.testing.assert_array_equal(obs, expected)


def _preview_run(setup, policy, act_ahead, ahead_steps=3, ticks=6, seed=0):
    """Joint states at 500 Hz with each instant's reference sent ``ahead_steps`` states (2 ms
    each) early, after the joint state; control at 100 Hz. Returns the loop, its results and
    the (q, qd, reference) of each tick's instant."""
    n = setup.act_dim
    rng = np.random.default_rng(seed)
    loop = AdaptiveController(setup.law, policy,
                              LoopConfig(control_rate_hz=100.0, act_ahead=act_ahead))
    steps = 5 * ticks
    refs = [tuple(rng.normal(size=n) * 0.1 for _ in range(3)) for _ in range(steps + ahead_steps)]
    states = [(rng.normal(size=n) * 0.1, rng.normal(size=n) * 0.1) for _ in range(steps)]
    stamp = [1.0 + 0.002 * k for k in range(steps + ahead_steps)]
    for k in range(ahead_steps):  # the preview's head start
        loop.on_reference(stamp[k], stamp[0], [], *refs[k])
    results, instants = [], []
    for k in range(steps):
        q, qd = states[k]
        if loop.on_joint_state(stamp[k], stamp[k], setup.robot.joint_names, q, qd):
            results.append(loop.tick(stamp[k]))
            loop.after_command()
            instants.append((q, qd, refs[k]))
        loop.on_reference(stamp[k + ahead_steps], stamp[k], [], *refs[k + ahead_steps])
    return loop, results, instants


def test_a_reference_preview_gives_each_tick_the_reference_of_its_instant(setup):
    """References sent ahead of their instant are kept: a tick meets the reference stamped at
    its joint state's instant, not the newest one."""
    recorder = RecordingPolicy(setup, action=np.full(setup.act_dim, 0.2))
    loop, results, instants = _preview_run(setup, recorder, act_ahead=False)
    assert len(results) == 6
    for result, (q, qd, ref) in zip(results, instants):
        expected = loop.clamp.clamp(effort_command(setup.law, recorder.action, q, qd, ref))
        np.testing.assert_allclose(result.efforts, expected, rtol=1e-12, atol=1e-12)


class ReferencePolicy(RecordingPolicy):
    """Acts on the reference view only (action = a function of q_ref and the previous action)
    and logs the order of its calls."""

    acts_on_reference = True

    def __init__(self, setup, log):
        super().__init__(setup)
        self.log = log
        self.scale = setup.law.observation.position_error_scale

    def act(self, obs):
        self.log.append("act")
        n = self.n
        # (q - default) + (q_ref - q) / scale = q_ref - default: the same on the reference
        q_ref = obs[:n] + obs[2 * n:3 * n] / self.scale
        return np.tanh(q_ref + 0.5 * obs[6 * n:7 * n]).astype(np.float64)

    def observe(self, obs, action, reward, next_obs):
        self.log.append("observe")
        super().observe(obs, action, reward, next_obs)


def _ahead_and_exact(setup, policy_type, log):
    """One preview run acting ahead (policy logging to ``log``) and one acting at the joint
    state; checks both command the same actions and efforts, returns the two policies."""
    ahead = policy_type(setup, log)
    loop, results, _ = _preview_run(setup, ahead, act_ahead=True)
    assert loop.act_ahead
    exact = policy_type(setup, [])
    _, exact_results, _ = _preview_run(setup, exact, act_ahead=False)
    assert len(results) == len(exact_results) == 6
    for a, b in zip(results, exact_results):
        np.testing.assert_allclose(a.action, b.action, atol=1e-6)
        np.testing.assert_allclose(a.efforts, b.efforts, atol=1e-5)
    return ahead, exact


def test_act_ahead_acts_when_the_reference_arrives_and_observes_after_the_command(setup):
    """With act_ahead, a policy acting on the reference view is called when the reference of a
    tick arrives; the tick adds only the PD feedback, and the transition that ended at the tick
    is observed once its command is out -- the same transitions and commands as acting at the
    joint state, for a policy whose actions do not depend on what it has observed."""
    log = []
    ahead, exact = _ahead_and_exact(setup, ReferencePolicy, log)
    assert len(ahead.observed) == len(exact.observed) == 5
    for a, b in zip(ahead.observed, exact.observed):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=1e-6)
    # the preview's head start prepares its three references (no grid yet); then each tick's
    # action is prepared when its reference arrives, after the previous tick's transition was
    # observed (once that tick's command was out): the ticks themselves call no policy
    assert log == ["act"] * 4 + ["observe", "act"] * 5


class SplitPolicy(ReferencePolicy):
    """An actor on the reference view plus a correction on the measured tracking error, split
    as ``act(obs) == correct(obs, base_act(obs))`` (the MAML correction's shape)."""

    acts_on_reference = False
    base_acts_on_reference = True

    def __init__(self, setup, log):
        super().__init__(setup, log)
        self.corrected = []  # the tracking errors the correction saw

    def base_act(self, obs):
        return super().act(obs)

    def correct(self, measured, action):
        self.log.append("correct")
        errors = np.array(measured.tracking_errors())
        self.corrected.append(errors)
        return np.clip(action + 0.5 * errors[:self.n], -1.0, 1.0)

    def act(self, obs):
        return self.correct(MeasuredObservation.given(obs, self.n), self.base_act(obs))


def test_act_ahead_prepares_the_actor_and_corrects_on_the_measured_state(setup):
    """A policy that splits (``ahead_parts``): its actor runs when the reference arrives, its
    correction at the joint state on the measured observation -- the same commands as acting
    at the joint state, for an actor whose action does not depend on what it has observed."""
    log = []
    ahead, exact = _ahead_and_exact(setup, SplitPolicy, log)
    n = setup.act_dim
    assert len(ahead.corrected) == 6
    for seen, measured in zip(ahead.corrected, exact.corrected):
        np.testing.assert_allclose(seen, measured, atol=1e-6)
        assert np.abs(seen[:n]).max() > 0.0  # a measured error, not the view's zero
    # every tick's actor call was made when its reference arrived (the head start's three,
    # then each after the previous tick's transition was observed): a tick only corrects
    assert log == ["act"] * 3 + ["correct", "act"] + ["correct", "observe", "act"] * 5


def _off_grid_run(setup, policy, act_ahead, ref_period, offset, ahead, ticks=6, seed=1):
    """Joint states at 500 Hz from t = 1 s, control at 100 Hz; references every
    ``ref_period`` s stamped ``offset`` s off the joint states' grid, each sent ``ahead`` s
    before its instant. Returns the results and, per tick, whether the policy acted inside
    it (its log grew during the tick)."""
    n = setup.act_dim
    rng = np.random.default_rng(seed)
    loop = AdaptiveController(setup.law, policy,
                              LoopConfig(control_rate_hz=100.0, act_ahead=act_ahead))
    steps = 5 * ticks
    ref_stamps = [1.0 + offset + ref_period * m
                  for m in range(int(0.002 * steps / ref_period) + 3)]
    sent = 0
    results, acted_in_tick = [], []
    for k in range(steps):
        now = 1.0 + 0.002 * k
        while sent < len(ref_stamps) and ref_stamps[sent] - ahead <= now + 1e-12:
            ref = tuple(rng.normal(size=n) * 0.1 for _ in range(3))
            loop.on_reference(ref_stamps[sent], now, [], *ref)
            sent += 1
        q, qd = rng.normal(size=n) * 0.1, rng.normal(size=n) * 0.1
        if loop.on_joint_state(now, now, setup.robot.joint_names, q, qd):
            calls = len(policy.log)
            results.append(loop.tick(now))
            acted_in_tick.append("act" in policy.log[calls:])
            loop.after_command()
    return results, acted_in_tick


@pytest.mark.parametrize("ref_period, offset, ahead", [
    (0.010, -0.003, 0.013),  # a 100 Hz planner 3 ms off the control grid
    (0.002, 0.001, 0.005),   # 500 Hz, halfway between joint states (the latency benchmark)
])
def test_act_ahead_prepares_the_reference_a_tick_uses_off_the_grid(setup, ref_period, offset,
                                                                   ahead):
    """The reference a tick uses (the newest stamped no later than its joint state) is
    prepared as soon as it is known -- once a later one has arrived -- even when no reference
    is stamped at the control instant: no tick after the first acts itself, and the commands
    are those of acting at the joint state."""
    ahead_policy = ReferencePolicy(setup, [])
    results, acted = _off_grid_run(setup, ahead_policy, True, ref_period, offset, ahead)
    exact_policy = ReferencePolicy(setup, [])
    exact, _ = _off_grid_run(setup, exact_policy, False, ref_period, offset, ahead)
    assert len(results) == len(exact) == 6 and not any(r.safe for r in results)
    assert acted[1:] == [False] * 5
    for a, b in zip(results, exact):
        np.testing.assert_allclose(a.action, b.action, atol=1e-6)
        np.testing.assert_allclose(a.efforts, b.efforts, atol=1e-5)


def test_act_ahead_is_refused_for_policies_that_read_the_measured_state(setup):
    recorder = RecordingPolicy(setup)  # no acts_on_reference
    loop = AdaptiveController(setup.law, recorder, LoopConfig(act_ahead=True))
    assert not loop.act_ahead


def test_a_preview_one_period_ahead_is_prepared_after_the_tick(setup):
    """A reference exactly one control period ahead arrives with the joint state of the tick
    before it; served first, it is not yet the next tick's -- the loop prepares it once that
    tick's command is out, so the next tick still meets a prepared action."""
    log = []
    policy = ReferencePolicy(setup, log)
    loop = AdaptiveController(setup.law, policy, LoopConfig(control_rate_hz=100.0,
                                                            act_ahead=True))
    n = setup.act_dim
    zeros, q = np.zeros(n), np.full(n, 0.1)
    loop.on_reference(1.0, 1.0, [], q, zeros, zeros)
    for k in range(4):
        t = 1.0 + 0.01 * k
        loop.on_reference(t + 0.01, t, [], q + 0.01 * (k + 1), zeros, zeros)  # served first
        assert loop.on_joint_state(t, t, setup.robot.joint_names, q, zeros)
        acts = log.count("act")
        loop.tick(t)
        assert log.count("act") == acts  # prepared in time: the tick calls no policy
        loop.after_command()


def test_impedance_setpoints_are_the_ticks_reference_not_a_preview(setup):
    """With references sent ahead, the impedance form of a tick's command is written on the
    reference the tick used (its instant's), not on the newest one received."""
    loop = AdaptiveController(setup.law, RecordingPolicy(setup), LoopConfig())
    n = setup.act_dim
    zeros, q = np.zeros(n), np.full(n, 0.2)
    loop.on_reference(1.0, 1.0, [], q, zeros, zeros)
    loop.on_reference(1.006, 1.0, [], q + 0.05, zeros, zeros)  # the preview
    assert loop.on_joint_state(1.0, 1.0, setup.robot.joint_names, q, zeros)
    result = loop.tick(1.0)
    np.testing.assert_array_equal(loop.impedance(result).position, q)
