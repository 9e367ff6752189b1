"""sim_node and adapter_node over real DDS (loopback, own domain), in lockstep where possible.

Nodes run in this process on a MultiThreadedExecutor; all traffic still goes through the rmw
(rclpy has no intra-process shortcut), so QoS matching and serialization are exercised.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from ros_harness import Collector, RosSession, domain_id, params, wait_for
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, String

from metarl_ros.control.loop_types import LoopConfig
from metarl_ros.control.law import build_observation, effort_command
from metarl_ros.control.policy_interface import PosteriorSummary
from metarl_ros.core.schema import ConfigError
from metarl_ros.nodes.adapter_node import AdapterNode
from metarl_ros.nodes.commands import STAMP_LABEL
from metarl_ros.nodes.common import (
    COMMAND_QOS,
    LATCHED_QOS,
    STATE_QOS,
    make_executor,
    ns_to_stamp,
)
from metarl_ros.nodes.sim_node import SimNode
from metarl_ros.policy.factory import make_policy, setup_contract
from metarl_ros.sim.env_config import load_env_setup

SETUP = load_env_setup()
JOINTS = list(SETUP.robot.joint_names)
N = len(JOINTS)
SCENARIO = "config/scenarios/default.yaml"


@pytest.fixture(scope="module")
def ros():
    session = RosSession(domain_id(offset=17))
    yield session
    session.close()


@pytest.fixture
def probe(ros):
    """A node for the test's own publishers and subscriptions; nodes are removed afterwards."""
    node = ros.add(Node("probe", context=ros.context))
    yield node
    ros.remove_all()


def _sim(ros, **overrides):
    values = {"real_time_factor": 0.0, "scenario": "", "duration_s": 2.0}
    values.update(overrides)
    return ros.add(SimNode(context=ros.context, parameter_overrides=params(**values)))


def _adapter(ros, policy=None, **overrides):
    values = {"use_sim_time": True}
    values.update(overrides)
    return ros.add(AdapterNode(context=ros.context, policy=policy,
                               parameter_overrides=params(**values)))


class TrackingMonitor:
    """Pairs /joint_states with /reference by stamp; tracking error per instant."""

    def __init__(self, node: Node) -> None:
        self.states: dict[int, np.ndarray] = {}
        self.references: dict[int, np.ndarray] = {}
        node.create_subscription(JointState, "/joint_states", self._on_state, STATE_QOS)
        node.create_subscription(JointState, "/reference", self._on_reference, STATE_QOS)

    @staticmethod
    def _key(msg) -> int:
        return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec

    def _on_state(self, msg) -> None:
        self.states[self._key(msg)] = np.array(msg.position)

    def _on_reference(self, msg) -> None:
        self.references[self._key(msg)] = np.array(msg.position)

    def errors(self, start_s: float = 0.0, end_s: float = math.inf) -> np.ndarray:
        keys = sorted(k for k in self.states if k in self.references
                      and start_s <= k * 1e-9 < end_s)
        return np.array([np.linalg.norm(self.references[k] - self.states[k]) for k in keys])


def _latest_status(collector: Collector, name_prefix: str) -> DiagnosticStatus | None:
    for array in reversed(collector.snapshot()):
        for status in array.status:
            if status.name.startswith(name_prefix):
                return status
    return None


def _values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


# ------------------------------------------------------------------------------ closed loop


def test_closed_loop_pd_tracks_reference_through_faults(ros, probe):
    """sim_node (lockstep) <-> adapter_node (policy=pd) close the loop; the error stays bounded."""
    monitor = TrackingMonitor(probe)
    diagnostics, latents, tasks = Collector(), Collector(), Collector()
    probe.create_subscription(DiagnosticArray, "/diagnostics", diagnostics, STATE_QOS)
    probe.create_subscription(Float64MultiArray, "/adapter_node/latent", latents, STATE_QOS)
    probe.create_subscription(String, "/sim/true_task", tasks, LATCHED_QOS)
    adapter = _adapter(ros, diagnostics_rate_hz=20.0)
    sim = _sim(ros, scenario=SCENARIO, duration_s=4.0)
    assert wait_for(sim.finished.is_set, 40.0), f"sim stuck at t={sim.sim.time_s}"
    assert sim.lockstep_timeouts == 0 and sim.commands_rejected == 0
    assert sim.commands_received == 400  # one command per control period, none lost
    # the adapter follows simulated time through /clock
    assert abs(adapter.get_clock().now().nanoseconds * 1e-9 - sim.sim.time_s) < 0.05
    errors = monitor.errors()
    assert len(errors) >= 395
    assert errors.max() < 0.15, errors.max()
    assert errors.mean() < 0.06, errors.mean()
    after_payload = monitor.errors(3.0)
    assert len(after_payload) > 90 and after_payload.max() < 0.2
    assert wait_for(lambda: len(tasks) >= 2, 2.0)
    labels = [json.loads(m.data)["label"] for m in tasks.snapshot()]
    assert labels[-1] == "payload pick-up (2.5 kg)"
    stats = adapter.loop.stats
    assert stats.policy_ticks == 400 and stats.safe_ticks == 0 and stats.policy_errors == 0
    assert stats.transitions == 399
    assert wait_for(lambda: _latest_status(diagnostics, "adapter_node") is not None, 2.0)
    values = _values(_latest_status(diagnostics, "adapter_node"))
    for key in ("inference_latency_p50_ms", "inference_latency_p99_ms", "late_ticks",
                "window_fill", "latent_shift", "adaptation_events", "policy_errors",
                "joint_state_age_s"):
        assert key in values
    # each tick's receipt-to-publish time, as the node measures it
    command_p50, command_p99 = (float(values[f"command_latency_{q}_ms"]) for q in ("p50", "p99"))
    assert 0.0 < command_p50 <= command_p99 < 1e3, (command_p50, command_p99)
    # sim_node reports at 1 Hz of wall time: a fast run can end before its first report
    assert wait_for(lambda: _latest_status(diagnostics, "sim_node") is not None, 2.0)
    assert len(latents) == 0  # pd has no latent


def test_lockstep_is_deterministic(ros, probe):
    """Two lockstep runs give bit-identical trajectories (no dependence on CPU speed)."""
    finals = []
    for _ in range(2):
        _adapter(ros)
        sim = _sim(ros, scenario=SCENARIO, duration_s=1.0)
        assert wait_for(sim.finished.is_set, 30.0)
        finals.append(sim.sim.true_state().position.copy())
        for node in [n for n in list(ros._nodes) if n is not probe]:
            ros.remove(node)
    np.testing.assert_array_equal(finals[0], finals[1])


def test_a_reference_preview_gives_the_same_lockstep_run(ros, probe):
    """sim_node sending each reference 20 ms ahead of its instant: the adapter still ticks on
    the reference of each joint state's instant (kept by stamp), so the run is the one without
    a preview, to the rounding of the reference's time (stamp vs simulated clock)."""
    finals, stamps = [], []
    for preview in (0.0, 0.02):
        monitor = TrackingMonitor(probe)
        _adapter(ros)
        sim = _sim(ros, scenario=SCENARIO, duration_s=1.0, reference_preview=preview)
        assert wait_for(sim.finished.is_set, 30.0)
        assert sim.commands_received == 100 and sim.lockstep_timeouts == 0
        finals.append(sim.sim.true_state().position.copy())
        stamps.append(max(monitor.references) - max(monitor.states))
        for node in [n for n in list(ros._nodes) if n is not probe]:
            ros.remove(node)
    np.testing.assert_allclose(finals[0], finals[1], rtol=0, atol=1e-9)
    assert stamps[0] == 0 and stamps[1] == 20_000_000  # the references were 20 ms ahead


def test_real_time_mode_runs_against_the_wall_clock(ros, probe):
    monitor = TrackingMonitor(probe)
    _adapter(ros)
    sim = _sim(ros, real_time_factor=2.0, duration_s=1.5)
    assert wait_for(sim.started.is_set, 10.0)
    start = time.monotonic()
    assert wait_for(sim.finished.is_set, 20.0)
    wall = time.monotonic() - start
    assert wall > 1.5 / 2.0 * 0.9, "ran faster than the requested real-time factor"
    # Wall-clock pacing on a shared 2-core machine: the controller may miss periods (the sim
    # then holds, and after command_timeout zeroes, its command), so only loose bounds here.
    assert sim.commands_received > 0.5 * 150
    errors = monitor.errors(0.2)
    assert len(errors) > 100 and np.median(errors) < 0.1


# ------------------------------------------------------------------------------ sim_node I/O


def test_fault_injection_via_topic_changes_the_true_task(ros, probe):
    tasks = Collector()
    probe.create_subscription(String, "/sim/true_task", tasks, LATCHED_QOS)
    publisher = probe.create_publisher(String, "/sim/set_task", STATE_QOS)
    _adapter(ros)
    sim = _sim(ros, duration_s=30.0)
    assert wait_for(lambda: sim.sim.time_s > 0.2, 10.0)
    assert wait_for(lambda: publisher.get_subscription_count() > 0, 5.0)
    publisher.publish(String(data=json.dumps({
        "label": "locked wrist", "payload_mass": 1.5,
        "motor_strength": {"lbr_iiwa_joint_4": 0.5}, "locked_joints": ["lbr_iiwa_joint_6"]})))
    assert wait_for(lambda: sim.sim.task.payload_mass == 1.5, 5.0)
    assert sim.sim.task.motor_strength[3] == 0.5 and sim.sim.task.locked_joints == (5,)
    assert wait_for(lambda: any("locked wrist" in m.data for m in tasks.snapshot()), 2.0)
    last = json.loads([m for m in tasks.snapshot() if "locked wrist" in m.data][-1].data)
    assert last["task"]["payload_mass"] == 1.5 and last["time_s"] > 0.2
    publisher.publish(String(data="{not json"))  # ignored with an error log, sim keeps going
    publisher.publish(String(data='{"base": "nominal", "label": "repaired"}'))
    assert wait_for(lambda: sim.sim.task.payload_mass == 0.0, 5.0)
    assert sim.sim.task.locked_joints == () and sim.task_label == "repaired"


def test_effort_commands_reuse_one_message_and_keep_each_commands_tag(ros, probe):
    """CommandPublisher fills one message per kind at every command: each published command
    carries its own efforts, in the controller's order, and its own tag (or none)."""
    from metarl_ros.nodes.commands import CommandPublisher, command_stamp_ns

    received = Collector()
    probe.create_subscription(Float64MultiArray, "/test_effort/commands", received,
                              COMMAND_QOS)
    order = np.arange(N)[::-1]  # the controller lists the joints the other way round
    commands = CommandPublisher(probe, "effort", "test_effort", JOINTS[::-1], order)
    wait_for(lambda: commands.subscription_count() > 0, 5.0)
    sent = [(np.arange(N) + 1.0, 11), (np.arange(N) * -2.0, None), (np.full(N, 0.5), 33)]
    for efforts, stamp in sent:
        assert commands.publish(efforts, None, stamp_ns=stamp)
    assert wait_for(lambda: len(received) == 3, 5.0)
    for msg, (efforts, stamp) in zip(received.snapshot(), sent):
        np.testing.assert_array_equal(msg.data, efforts[order])
        assert command_stamp_ns(msg) == stamp
        assert len(msg.layout.dim) == (0 if stamp is None else 1)


def test_sim_rejects_bad_commands_and_holds_zero_effort(ros, probe):
    """Without a controller, lockstep waits at t=0; bad commands step with zero effort."""
    commands = probe.create_publisher(Float64MultiArray, "/effort_controller/commands",
                                      COMMAND_QOS)
    sim = _sim(ros, duration_s=10.0)
    time.sleep(0.3)
    assert sim.sim.time_s == 0.0  # waits for a controller
    assert wait_for(lambda: commands.get_subscription_count() > 0, 5.0)
    commands.publish(Float64MultiArray(data=[1.0] * (N - 1)))
    assert wait_for(lambda: sim.commands_rejected == 1 and sim.sim.time_s > 0, 5.0)
    commands.publish(Float64MultiArray(data=[float("nan")] + [0.0] * (N - 1)))
    assert wait_for(lambda: sim.commands_rejected == 2, 5.0)
    # zero effort: the motors deliver only the firmware's gravity compensation
    gravity_only = sim.sim.true_state().effort
    assert np.isfinite(gravity_only).all()
    commands.publish(Float64MultiArray(data=[5.0] * N))
    assert wait_for(lambda: sim.commands_received == 3, 5.0)
    assert sim.commands_rejected == 2


def test_sim_refuses_a_joint_state_rate_that_does_not_fit_the_physics_rate(ros, probe):
    """A clear error; the half-built node can still be destroyed (rclpy destroys every node
    of a context that shuts down, and a node kept alive by a traceback is one of them)."""
    with pytest.raises(ConfigError, match=r"joint_state_rate_hz \(333.0\) must divide") as info:
        _sim(ros, joint_state_rate_hz=333.0)
    half_built = next(entry.frame.f_locals["self"] for entry in info.traceback
                      if isinstance(entry.frame.f_locals.get("self"), SimNode))
    half_built.destroy_node()


def test_lockstep_applies_one_answer_per_instant(ros, probe):
    """Two answers to the instant sim_node waits for (a controller answering a re-published
    t = 0 twice): the first is applied, the second ignored, however soon it follows."""
    commands = probe.create_publisher(Float64MultiArray, "/effort_controller/commands",
                                      COMMAND_QOS)
    sim = _sim(ros, duration_s=10.0)
    assert wait_for(lambda: commands.get_subscription_count() > 0, 5.0)
    for value in (1.0, 2.0):
        msg = Float64MultiArray(data=[value] * N)
        msg.layout.dim = [MultiArrayDimension(label=f"{STAMP_LABEL}0", size=N, stride=N)]
        commands.publish(msg)
    assert wait_for(lambda: sim.commands_received + sim.commands_ignored == 2, 5.0)
    assert sim.commands_received == 1 and sim.commands_ignored == 1
    assert wait_for(lambda: sim.sim.time_s > 0, 5.0)  # t = 0 stepped with the first answer
    np.testing.assert_array_equal(sim.commands.command, [1.0] * N)


# ------------------------------------------------------------------------------ adapter_node I/O


class FakeRobot:
    """Publishes references and joint states from the probe; collects commands."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.states = node.create_publisher(JointState, "/joint_states", STATE_QOS)
        self.refs = node.create_publisher(JointState, "/reference", STATE_QOS)
        self.commands = Collector()
        node.create_subscription(Float64MultiArray, "/effort_controller/commands",
                                 self.commands, COMMAND_QOS)
        self.diagnostics = Collector()
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics, STATE_QOS)
        # stamped like a robot's driver: on the wall clock, as the node's own clock
        self.t_ns = node.get_clock().now().nanoseconds

    def connected(self) -> bool:
        return (self.states.get_subscription_count() > 0
                and self.refs.get_subscription_count() > 0
                and self.node.count_publishers("/effort_controller/commands") > 0)

    def send(self, names, position, velocity, ref=None, step=True) -> None:
        if step:
            self.t_ns += 10_000_000
        stamp = ns_to_stamp(self.t_ns)
        q = np.asarray(SETUP.robot.default_pose)
        ref = ref or (q.tolist(), [0.0] * N, [0.0] * N)
        msg = JointState(name=JOINTS, position=ref[0], velocity=ref[1], effort=ref[2])
        msg.header.stamp = stamp
        self.refs.publish(msg)
        msg = JointState(name=list(names), position=list(position), velocity=list(velocity))
        msg.header.stamp = stamp
        self.states.publish(msg)


def _expected_efforts(policy, position, velocity, ref, previous_action):
    """What the adapter must command: the shared observation and effort functions, clamped."""
    ref = tuple(np.asarray(r, dtype=np.float64) for r in ref)
    obs = build_observation(SETUP.law, np.asarray(position), np.asarray(velocity), ref,
                            np.asarray(previous_action, dtype=np.float32))
    action = np.clip(policy.act(obs), -1, 1)
    efforts = effort_command(SETUP.law, action, np.asarray(position), np.asarray(velocity), ref)
    limits = np.array(SETUP.robot.effort_limits)
    return np.clip(efforts, -limits, limits), action


def test_adapter_maps_joints_by_name_and_rejects_bad_messages(ros, probe, capfd):
    robot = FakeRobot(probe)
    # PD feedback from the env plus an extra PD as "policy", so the action depends on the state
    policy = make_policy("pd", SETUP, pd_kp=[20.0] * N, pd_kd=[2.0] * N)
    adapter = _adapter(ros, policy=policy, use_sim_time=False, watchdog_timeout=5.0)
    assert wait_for(robot.connected, 5.0)
    rng = np.random.default_rng(0)
    q = np.asarray(SETUP.robot.default_pose) + rng.normal(0, 0.05, N)
    qd = rng.normal(0, 0.1, N)
    ref = ((q + 0.02).tolist(), [0.1] * N, [0.0] * N)
    # shuffled order plus two joints the policy does not know (one of them NaN)
    order = rng.permutation(N)
    names = [JOINTS[i] for i in order] + ["gripper_finger", "head_pan"]
    robot.send(names, list(q[order]) + [0.01, math.nan], list(qd[order]) + [0.0, 0.0], ref)
    assert wait_for(lambda: len(robot.commands) == 1, 5.0)
    expected, action = _expected_efforts(policy, q, qd, ref, np.zeros(N))
    assert np.abs(action).max() > 0.01
    np.testing.assert_allclose(robot.commands.snapshot()[0].data, expected, rtol=1e-5, atol=1e-6)
    # NaN on a controlled joint, wrong length, missing joint: no command, counted, logged
    robot.send(JOINTS, [math.nan] + list(q[1:]), list(qd), ref)
    robot.send(JOINTS, list(q[:-1]), list(qd), ref)
    robot.send(JOINTS[:-1], list(q[:-1]), list(qd[:-1]), ref)
    # bytes that are no JointState at all (the node reads joint states raw): refused, not a
    # crash of the node's executor
    robot.states.publish(b"\x00\x01\x00\x00\xff")
    assert wait_for(lambda: adapter.loop.stats.rejected_joint_states == 4, 5.0)
    time.sleep(0.1)
    assert len(robot.commands) == 1
    by_reason = adapter.loop.stats.rejections_by_reason
    assert by_reason == {"joint_state:non_finite": 1, "joint_state:length_mismatch": 1,
                         "joint_state:missing_joints": 1, "joint_state:unreadable": 1}
    # a good message again: the loop goes on, previous action fed into the observation
    robot.send(JOINTS, list(q), list(qd), ref)
    assert wait_for(lambda: len(robot.commands) == 2, 5.0)
    expected, _ = _expected_efforts(policy, q, qd, ref, action)
    np.testing.assert_allclose(robot.commands.snapshot()[1].data, expected, rtol=1e-5, atol=1e-6)
    err = capfd.readouterr().err
    # each kind of rejection is logged (throttled per kind) with its reason
    for reason in ("non_finite", "length_mismatch", "missing_joints", "unreadable"):
        assert f"rejected joint state: {reason}" in err
    assert adapter.loop.stats.policy_errors == 0


def test_stale_sensors_command_safe_action_and_report_it(ros, probe):
    robot = FakeRobot(probe)
    adapter = _adapter(ros, use_sim_time=False, watchdog_timeout=0.15, diagnostics_rate_hz=20.0,
                       safe_mode="zero")
    assert wait_for(robot.connected, 5.0)
    q = np.asarray(SETUP.robot.default_pose)
    ref = ((q + 0.05).tolist(), [0.0] * N, [0.0] * N)
    for _ in range(3):
        robot.send(JOINTS, list(q), [0.0] * N, ref)
        time.sleep(0.01)
    assert wait_for(lambda: len(robot.commands) >= 3, 5.0)
    assert any(abs(v) > 1.0 for v in robot.commands.snapshot()[-1].data)  # PD pushes
    robot.commands.clear()
    # sensors stop: within the timeout plus a few periods the safe action (zero) arrives
    assert wait_for(lambda: len(robot.commands) >= 3, 2.0)
    assert all(list(m.data) == [0.0] * N for m in robot.commands.snapshot())
    assert adapter.loop.safe_reason == "sensor_stale"

    def stale_reported():
        status = _latest_status(robot.diagnostics, "adapter_node")
        return (status is not None and status.level == DiagnosticStatus.ERROR
                and _values(status)["state"] == "sensor_stale")

    assert wait_for(stale_reported, 3.0)
    # data back: the policy resumes
    robot.commands.clear()
    robot.send(JOINTS, list(q), [0.0] * N, ref)
    assert wait_for(lambda: adapter.loop.safe_reason == "", 3.0)
    assert wait_for(lambda: any(any(abs(v) > 1.0 for v in m.data)
                                for m in robot.commands.snapshot()), 3.0)


class FlakyPolicy:
    """A PD policy whose act() raises every ``every``-th call; has a latent to publish."""

    def __init__(self, every: int) -> None:
        self._pd = make_policy("pd", SETUP)
        self.contract = setup_contract(SETUP)
        self.every = every
        self.calls = 0
        self.observed = 0

    def reset(self) -> None:
        pass

    def observe(self, obs, action, reward, next_obs) -> None:
        self.observed += 1

    def act(self, obs):
        self.calls += 1
        if self.calls % self.every == 0:
            raise RuntimeError("simulated policy failure")
        return self._pd.act(obs)

    def posterior(self) -> PosteriorSummary:
        return PosteriorSummary(np.full(3, 0.1 * self.calls), np.full(3, 0.5), self.observed)


def test_policy_exception_gives_safe_action_and_loop_continues(ros, probe, capfd):
    monitor = TrackingMonitor(probe)
    latents = Collector()
    probe.create_subscription(Float64MultiArray, "/adapter_node/latent", latents, STATE_QOS)
    policy = FlakyPolicy(every=10)
    adapter = _adapter(ros, policy=policy)
    sim = _sim(ros, duration_s=2.0)
    assert wait_for(sim.finished.is_set, 30.0), f"sim stuck at t={sim.sim.time_s}"
    assert sim.lockstep_timeouts == 0  # every period got a command, failures included
    stats = adapter.loop.stats
    assert stats.ticks == 200 and stats.policy_errors == 20 and stats.safe_ticks == 20
    assert "simulated policy failure" in stats.last_policy_error
    assert monitor.errors().max() < 0.2  # one zero-effort period in ten is survivable
    out = capfd.readouterr().err
    assert "policy failed (RuntimeError: simulated policy failure)" in out
    assert out.count("policy failed") < 20  # throttled
    # the latent goes out as mean then std, with the documented layout
    assert wait_for(lambda: len(latents) > 0, 2.0)
    msg = latents.snapshot()[-1]
    assert [d.label for d in msg.layout.dim] == ["mean_std", "latent"]
    assert len(msg.data) == 6 and list(msg.data[3:]) == [0.5] * 3


def test_loop_config_defaults_match_the_node_yaml():
    """config/adapter_node.yaml and LoopConfig agree on the safety defaults."""
    import yaml

    from metarl_ros.core.resources import resolve_path

    data = yaml.safe_load(resolve_path("config/adapter_node.yaml").read_text())
    node = data["adapter_node"]["ros__parameters"]
    assert node["watchdog_timeout"] == LoopConfig().watchdog_timeout_s
    assert node["safe_mode"] == LoopConfig().safe_mode
    for key, value in node.items():
        if isinstance(value, float):
            assert isinstance(value, float), key


# ------------------------------------------------------------------------------ parameters


def _set(node, **values):
    from rclpy.parameter import Parameter

    return node.set_parameters([Parameter(k, value=v) for k, v in values.items()])[0]


def test_adapter_parameters_apply_live_or_are_refused_with_the_reason(ros):
    """ros2 param set: the safe ones apply at once, the rest are refused as read-only (they
    used to succeed while nothing changed), and choices are checked."""
    node = _adapter(ros)
    try:
        result = _set(node, effort_limit_scale=0.25)
        assert result.successful
        assert node.loop.config.effort_limit_scale == 0.25
        np.testing.assert_allclose(node.loop.clamp.limits,
                                   0.25 * np.asarray(SETUP.robot.effort_limits))
        result = _set(node, safe_mode="bogus")
        assert not result.successful and "zero, hold" in result.reason
        assert node.loop.config.safe_mode == "zero"
        assert _set(node, safe_mode="hold").successful and node.loop.safe.mode == "hold"
        assert node.loop.diagnostics(0.0).values["safe_mode"] == "hold"
        for name, value in (("env_config", "other.yaml"), ("control_rate_hz", 50.0),
                            ("policy", "pearl"), ("watchdog_timeout", 0.5)):
            result = _set(node, **{name: value})
            assert not result.successful, name
            assert "read-only" in result.reason and "restart" in result.reason, result.reason
            assert node.get_parameter(name).value != value
        result = _set(node, effort_limit_scale=5.0)  # the descriptor's range still applies
        assert not result.successful and node.loop.config.effort_limit_scale == 0.25
        assert _set(node, use_sim_time=True).successful  # ROS's own parameters are left alone
    finally:
        ros.remove_all()


def test_executor_choices_are_checked_with_the_reason(ros, monkeypatch):
    """The executor a node spins on: unknown names, events with threads, and events on an
    rclpy without it (Humble, Jazzy) are refused, each naming what to change."""
    with pytest.raises(ValueError, match="executor 'bogus': must be one of single, events"):
        make_executor("bogus")
    with pytest.raises(ValueError, match="executor_threads=2 needs executor 'single'"):
        make_executor("events", num_threads=2)
    with pytest.raises(ValueError, match="executor=events runs one thread"):
        _adapter(ros, executor="events", executor_threads=2)
    with pytest.raises(ValueError, match="parameter executor='bogus'"):
        _adapter(ros, executor="bogus")
    monkeypatch.setitem(sys.modules, "rclpy.experimental", None)  # import fails, as on Jazzy
    with pytest.raises(ValueError, match="needs rclpy's EventsExecutor .*use executor 'single'"):
        make_executor("events")


def test_sim_real_time_factor_applies_live_between_real_time_factors(ros):
    sim = _sim(ros, real_time_factor=1.0)
    try:
        assert _set(sim, real_time_factor=4.0).successful and sim.real_time_factor == 4.0
        result = _set(sim, real_time_factor=0.0)
        assert not result.successful and "restart" in result.reason
        assert sim.real_time_factor == 4.0
        result = _set(sim, scenario="config/scenarios/default.yaml")
        assert not result.successful and "read-only" in result.reason
    finally:
        ros.remove_all()
    lockstep = _sim(ros)
    try:
        result = _set(lockstep, real_time_factor=1.0)
        assert not result.successful and "lockstep" in result.reason
        assert lockstep.lockstep and lockstep.real_time_factor == 0.0
    finally:
        ros.remove_all()


def test_gui_without_a_display_exits_with_a_fatal_line(tmp_path):
    """PyBullet's GUI exits the process from C when there is no display: ask first, and fail
    with one FATAL line naming the problem."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["ROS_DOMAIN_ID"] = str(domain_id(offset=29))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from metarl_ros.nodes.sim_node import main; "
         "sys.exit(main(['--ros-args', '-p', 'gui:=true']))"],
        env=env, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "[FATAL]" in out and "DISPLAY is not set" in out and "gui:=false" in out, out
    assert "Traceback" not in out
