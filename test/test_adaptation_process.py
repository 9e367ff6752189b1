"""MAML adaptation in a process of its own (metarl_ros.policy.adaptation_process) and the
robot's PEARL+MAML policy built on it (metarl_ros.policy.process_adapted).

* the process's held corrections equal in-process DynamicsAdaptation's on the same
  transitions, step for step;
* the control side applies the snapshots it reports, discards those of an earlier reset, and
  keeps acting -- un-adapted, with a warning on the loop's diagnostics -- when it is killed;
* the factory builds it for ``pearl`` + MAML + ``background`` (shipped model: no torch in the
  control path, actions as the torch policy's), ``inline`` stays the in-process torch policy;
* low-priority node work waits for the end of a tick (AfterTick).

No ROS. The child processes are started for real (a second or two each: they import torch).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metarl_ros.control.controller import AdaptiveController  # noqa: E402
from metarl_ros.control.loop_types import LoopConfig  # noqa: E402
from metarl_ros.control.measured import MeasuredObservation  # noqa: E402
from metarl_ros.control.policy_interface import PolicyContract, PosteriorSummary  # noqa: E402
from metarl_ros.core.resources import resolve_path  # noqa: E402
from metarl_ros.learning.dynamics_config import MAMLConfig  # noqa: E402
from metarl_ros.learning.dynamics_models import make_checkpoint  # noqa: E402
from metarl_ros.learning.torque_model import TorqueGainDynamics  # noqa: E402
from metarl_ros.nodes.after_tick import AfterTick  # noqa: E402
from metarl_ros.policy.adaptation_process import (  # noqa: E402
    AdaptationProcess,
    RecordLayout,
    WorkerSpec,
)
from metarl_ros.policy.dynamics_adaptation import (  # noqa: E402
    DynamicsAdaptation,
    correction_settings,
)
from metarl_ros.policy.held_correction import (  # noqa: E402
    LAG_HORIZON_TICKS,
    CorrectionApplier,
    HeldCorrection,
)
from metarl_ros.policy.process_adapted import (  # noqa: E402
    POLL_EVERY_TICKS,
    ProcessAdaptedPolicy,
)
from dynamics_helpers import toy_torque_model  # noqa: E402

torch.set_num_threads(1)
START_S = 60.0  # the child imports torch: slow on a loaded machine
MODEL = resolve_path("models/pearl/model.pt")
CONFIG = MAMLConfig(hidden_sizes=(), inner_steps=10, inner_lr=1.5, max_step_norm=None)
OPTIONS = {"window": 40, "max_correction": 10.0, "min_improvement": 0.6, "lag_band_rad": None}


def _spec(model: TorqueGainDynamics, period_s: float) -> WorkerSpec:
    checkpoint = make_checkpoint(model, CONFIG)
    checkpoint["model_state"] = {k: v.numpy() for k, v in checkpoint["model_state"].items()}
    return WorkerSpec(checkpoint, dict(OPTIONS), period_s, RecordLayout(8, 2, 0))


def _transitions(n: int, strength: tuple[float, float], seed: int) -> list[tuple]:
    """(obs, action, next_obs) in float32 (what the pipe carries): delta_v = strength * a."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        obs = rng.normal(size=8).astype(np.float32)
        action = rng.uniform(-1, 1, size=2).astype(np.float32)
        next_obs = obs.copy()
        next_obs[2:4] += np.asarray(strength, np.float32) * action
        next_obs[2:4] += 0.01 * rng.normal(size=2).astype(np.float32)
        out.append((obs, action, next_obs))
    return out


def _wait_report(process: AdaptationProcess, done, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = process.poll()
        if report is not None and done(report):
            return report
        time.sleep(0.01)
    raise AssertionError(f"no such report within {timeout} s ({process.info})")


@pytest.fixture
def toy_process():
    process = AdaptationProcess(_spec(toy_torque_model().float(), period_s=1.0))
    yield process
    process.close()


@pytest.mark.parametrize("sending", ["at_once", "flush", "next_record"])
def test_process_corrections_equal_in_process_adaptation(toy_process, sending) -> None:
    """The same transitions and queries through the pipe and in process: after the same
    number of steps on the same windows, the same held correction, bit for bit -- whether each
    query is sent at once, queued and flushed after the command (``after_command``), or left
    for the next transition's record to send first."""
    process = toy_process
    assert process.wait_ready(START_S), process.info
    process.reset()
    local = DynamicsAdaptation(toy_torque_model().float(), CONFIG, **OPTIONS)
    local.reset()  # as the child did on the reset (snapshot versions count resets too)
    query = (np.full(8, 0.1, np.float32), np.asarray([0.5, -0.5], np.float32))
    intact, weak = _transitions(40, (1.0, 1.0), 0), _transitions(40, (0.25, 1.0), 1)
    report = _wait_report(process, lambda r: True)  # a step just happened (empty window)
    for batch, more_steps in ((intact, 1), (weak, 3)):  # the weak phase needs 2 agreeing steps
        for _ in range(report.steps - local.steps):  # replay the steps the child took
            local.step()
        # a burst right after a step: all of it is in the window at the child's next step
        for obs, action, next_obs in batch:
            process.record(obs, action, next_obs, None)
            process.query(*query, None, send=sending == "at_once")
            if sending == "flush":
                process.flush()
            local.record(obs, action, next_obs, None)
            local.set_query(*query, None)
        process.flush()  # the burst's last query (a no-op unless left for the next record)
        wanted = report.steps + more_steps
        report = _wait_report(process, lambda r, w=wanted: r.steps >= w)
        for _ in range(report.steps - local.steps):
            local.step()
        held = local.held()
        assert report.steps == local.steps
        assert report.version == local.adapter.version
        np.testing.assert_array_equal(report.held, held.to_arrays())
        assert report.active == held.active
    assert report.transitions == 80
    assert report.active and report.held[0, 0] > 2.0  # joint 0 (a quarter strength) corrected
    assert report.held[0, 1] == 1.0 and process.info.dropped_records == 0


class _Inner:
    """A stand-in posterior + actor: action = first two observation entries."""

    contract = PolicyContract(("a", "b"), 100.0, 1, 0, 8, 2, (1.0, 1.0), (10.0, 10.0))

    def reset(self) -> None:
        pass

    def observe(self, obs, action, reward, next_obs) -> None:
        pass

    def act(self, obs):
        return np.asarray(obs[:2], np.float32).copy()

    def latent_mean(self):
        return np.zeros(0, np.float32)

    def posterior(self):
        return PosteriorSummary(np.zeros(0), np.zeros(0), 0)


def test_close_ends_a_stuck_child_within_the_nodes_teardown_bound(toy_process) -> None:
    """A child that reads no EOF and takes no SIGTERM (stopped here) is killed by close()
    before run_node's teardown watchdog would end the node and leave the child behind."""
    from metarl_ros.nodes.common import TEARDOWN_TIMEOUT_S

    assert toy_process.wait_ready(60.0)
    os.kill(toy_process.info.pid, signal.SIGSTOP)  # SIGTERM stays pending; SIGKILL does not
    start = time.monotonic()
    toy_process.close()
    took = time.monotonic() - start
    assert toy_process.info.exit_code == -signal.SIGKILL, toy_process.info
    assert took < TEARDOWN_TIMEOUT_S, took


def test_control_side_applies_reports_and_survives_a_killed_process(toy_process) -> None:
    """Transitions go through ProcessAdaptedPolicy.observe/act; the corrections the child
    reports are what act applies; after a reset only the new epoch's reports count; killed,
    the child leaves the policy acting un-adapted and the loop's diagnostics warning."""
    model = toy_torque_model().float()
    policy = ProcessAdaptedPolicy(_Inner(), CorrectionApplier(correction_settings(
        model, OPTIONS["max_correction"], OPTIONS["lag_band_rad"])), toy_process)
    assert toy_process.wait_ready(START_S), toy_process.info

    def feed(transitions) -> None:
        for obs, action, next_obs in transitions:
            policy.observe(obs, action, 0.0, next_obs)
            policy.act(next_obs)

    probe = np.zeros(8, np.float32)
    probe[:2] = (0.2, -0.2)
    feed(_transitions(40, (1.0, 1.0), 0))
    _wait_steps(policy, 1)
    feed(_transitions(40, (0.25, 1.0), 1))
    _wait_steps(policy, policy.process.steps + 3, active=True)
    report = toy_process.info.last_report
    assert report is not None and report.active and report.transitions == 80
    held = policy.applier.held  # the report's correction, applied whole
    np.testing.assert_array_equal(held.to_arrays(), report.held)
    corrected = policy.act(probe)
    expected = np.clip(probe[:2] + np.clip((held.ratio - 1.0) * probe[:2] + held.bias,
                                           -10.0, 10.0), -1.0, 1.0)
    np.testing.assert_allclose(corrected, expected, rtol=1e-6)
    assert abs(corrected[0]) > abs(probe[0]) * 1.5  # joint 0 (a quarter strength) boosted
    assert policy.status().level == "ok"
    # reset: nothing held, and what the child reports next counts transitions from zero
    policy.reset()
    np.testing.assert_allclose(policy.act(probe), probe[:2])
    feed(_transitions(10, (1.0, 1.0), 2))
    _wait_steps(policy, 1)
    assert toy_process.info.last_report.transitions == 10
    # the process dies: the next poll notices and it acts un-adapted; the loop warns
    held_before = HeldCorrection(np.asarray([2.0, 1.0], np.float32), np.zeros(2, np.float32),
                                 np.zeros(2, np.float32), True)
    policy.applier.hold(held_before)
    os.kill(toy_process.info.pid, signal.SIGKILL)
    time.sleep(0.5)
    for _ in range(POLL_EVERY_TICKS):  # it looks for reports every few commands
        policy.act(probe)
        policy.after_command()
    np.testing.assert_allclose(policy.act(probe), probe[:2])
    status = policy.status()
    assert status.level == "warn" and "ended" in status.message and "un-adapted" in status.message
    assert status.values["maml.process_state"] == "dead"
    for obs, action, next_obs in _transitions(3, (1.0, 1.0), 3):  # goes on, never raises
        policy.observe(obs, action, 0.0, next_obs)
        assert policy.act(next_obs).shape == (2,)
    from metarl_ros.sim.env_config import load_env_setup

    loop = AdaptiveController(load_env_setup().law, policy, LoopConfig())
    report = loop.diagnostics(0.0)
    assert report.values["maml.process_state"] == "dead"
    assert report.policy is not None and report.policy.level == "warn"
    assert report.level in ("warn", "error") and report.values["maml.adaptation"] == "process"


class _CallLog:
    """A stand-in adaptation process that logs what the control side asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def reset(self) -> None:
        self.calls.append(("reset",))

    def record(self, obs, action, next_obs, latent) -> None:
        self.calls.append(("record",))

    def query(self, obs, action, latent, send: bool = True) -> None:
        self.calls.append(("query", obs.copy(), action.copy(), send))

    def flush(self) -> None:
        self.calls.append(("flush",))

    def poll(self):
        return None


def test_the_query_reaches_the_process_record_after_the_command() -> None:
    """correct() (on the sensor-to-command path) only remembers the query; after_command()
    copies it into the process's record and flushes; a transition observed before that still
    gets the query first, as the adaptation process needs it."""
    model = toy_torque_model().float()
    log = _CallLog()
    policy = ProcessAdaptedPolicy(_Inner(), CorrectionApplier(correction_settings(
        model, OPTIONS["max_correction"], OPTIONS["lag_band_rad"])), log)
    obs = np.arange(8, dtype=np.float32) / 10.0
    action = np.asarray([0.3, -0.2], np.float32)
    log.calls.clear()
    built = []

    class Measured(MeasuredObservation):  # counts the builds of the whole observation
        __slots__ = ()

        def observation(self):
            built.append(1)
            return super().observation()

    policy.correct(Measured.given(obs, 2), action)
    assert log.calls == [] and built == []  # nothing on the command's path
    policy.after_command()
    assert built == [1]
    assert [c[0] for c in log.calls] == ["query", "flush"]
    _, sent_obs, sent_action, send = log.calls[0]
    np.testing.assert_array_equal(sent_obs, obs)
    np.testing.assert_array_equal(sent_action, action)
    assert send is False
    log.calls.clear()
    policy.correct(MeasuredObservation.given(obs, 2), action)
    policy.observe(obs, action, 0.0, obs)  # no after_command between: the query goes first
    assert [c[0] for c in log.calls] == ["query", "record"]


def _wait_steps(policy: ProcessAdaptedPolicy, steps: int, active: bool = False,
                timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        policy.act(np.zeros(8, np.float32))
        policy.after_command()  # polls for reports every few ticks
        report = policy.process.info.last_report
        if report is not None and report.steps >= steps and (report.active or not active):
            return
        time.sleep(0.02)
    raise AssertionError(f"no report with {steps} steps within {timeout} s")


def test_after_tick_defers_jobs_while_ticks_come() -> None:
    now = [0.0]
    after = AfterTick(0.02, clock=lambda: now[0])
    ran: list[str] = []
    after.submit("diag", lambda: ran.append("diag"))  # no tick yet: at once
    assert ran == ["diag"]
    after.tick_done()
    now[0] = 0.005
    after.submit("diag", lambda: ran.append("diag1"))
    after.submit("diag", lambda: ran.append("diag2"))  # replaces the pending one
    after.submit("context", lambda: ran.append("context"))
    assert ran == ["diag"]
    after.tick_done()
    assert ran == ["diag", "diag2", "context"]
    after.submit("diag", lambda: ran.append("late"))
    now[0] = 0.1  # ticks stopped: the watchdog's poll runs it
    after.run_if_idle()
    assert ran[-1] == "late"
    off = AfterTick(0.02, enabled=False, clock=lambda: now[0])
    off.tick_done()
    off.submit("diag", lambda: ran.append("now"))
    assert ran[-1] == "now"


@pytest.mark.skipif(not MODEL.is_file(), reason=f"no shipped model at {MODEL}")
def test_factory_runs_pearl_maml_background_in_a_process_with_onnx_control_path() -> None:
    from metarl_ros.learning.saved_model import load_model
    from metarl_ros.policy.factory import make_policy
    from metarl_ros.policy.torch_policy import TorchAdaptivePolicy
    from metarl_ros.sim.env_config import load_env_setup

    setup = load_env_setup(str(resolve_path("sim/envs/iiwa7_compliant.yaml")))  # the models' env
    inline = make_policy("pearl", setup, model_path=MODEL, adaptation_schedule="inline")
    assert isinstance(inline, TorchAdaptivePolicy) and inline.adaptation is not None
    policy = make_policy("pearl", setup, model_path=MODEL)
    try:
        assert isinstance(policy, ProcessAdaptedPolicy) and policy.control_path == "onnx"
        reference = TorchAdaptivePolicy(load_model(MODEL))  # posterior + actor, no MAML
        # the actor sees the reference view, but the correction scales the torque the PD
        # feedback is part of: only the actor's part may act before the joint state arrives
        assert reference.acts_on_reference
        assert not policy.acts_on_reference and not inline.acts_on_reference
        assert policy.base_acts_on_reference and inline.base_acts_on_reference
        assert policy.process.wait_ready(START_S), policy.process.info
        rng = np.random.default_rng(0)
        obs = (rng.normal(size=setup.obs_dim) * 0.1).astype(np.float32)
        for _ in range(60):  # before any correction: the torch policy's actions
            action = policy.act(obs)
            np.testing.assert_allclose(action, reference.act(obs), atol=1e-5)
            next_obs = obs + (rng.normal(size=obs.shape) * 0.01).astype(np.float32)
            policy.observe(obs, action, -1.0, next_obs)
            reference.observe(obs, action, -1.0, next_obs)
            obs = next_obs
        np.testing.assert_allclose(policy.posterior().mean, reference.posterior().mean,
                                   atol=1e-5)
        # the lag gate averages the measured tracking error (the reference view's is zero:
        # the gate could never open when the correction read the actor's view)
        n = setup.act_dim
        assert np.abs(policy.applier.mean_lag).max() > 1e-4, policy.applier.mean_lag
        inline.act(obs)
        np.testing.assert_allclose(inline.adaptation.applier.mean_lag,
                                   obs[2 * n:3 * n] / inline.adaptation.applier.settings
                                   .position_error_scale / LAG_HORIZON_TICKS, rtol=1e-5)
        deadline = time.monotonic() + 30.0
        while policy.process.steps < 2 and time.monotonic() < deadline:
            policy.act(obs)
            policy.after_command()  # sends the record, takes reports
            time.sleep(0.05)
        status = policy.status()
        assert status.level == "ok", status
        assert int(status.values["maml.steps"]) >= 2
        assert int(status.values["maml.snapshot_version"]) >= 1
    finally:
        policy.close()
    assert policy.process.info.state == "closed" and policy.process.info.exit_code is not None


@pytest.mark.skipif(not MODEL.is_file(), reason=f"no shipped model at {MODEL}")
def test_adapter_node_keeps_commanding_and_reports_a_dead_adaptation_process() -> None:
    """adapter_node (pearl, MAML, background): the adaptation process reports on
    /diagnostics; killed, the node keeps commanding, WARNs on /diagnostics and logs it."""
    rclpy = pytest.importorskip("rclpy")
    from rclpy.context import Context
    from ros_harness import domain_id, params

    from metarl_ros.nodes.adapter_node import AdapterNode

    context = Context()
    rclpy.init(context=context, domain_id=domain_id(offset=41))
    node = AdapterNode(context=context, parameter_overrides=params(
        policy="pearl", model_path=str(MODEL), use_sim_time=False, command_type="trajectory"))
    logged: list[tuple[str, str]] = []

    class Logger:
        def __getattr__(self, level):
            return lambda message: logged.append((level, message))

    node.get_logger = Logger  # type: ignore[method-assign]
    try:
        policy = node.policy
        assert isinstance(policy, ProcessAdaptedPolicy) and policy.control_path == "onnx"
        assert policy.process.wait_ready(START_S), policy.process.info
        setup = node.setup
        names, q = list(setup.robot.joint_names), np.asarray(setup.robot.default_pose)
        zeros = [0.0] * q.size
        start = time.time()

        def ticks(count: int) -> list:
            results = []
            for _ in range(count):
                now = time.time()
                node.loop.on_reference(now, now, names, list(q + 0.01), zeros, zeros)
                if node.loop.on_joint_state(now, now, names, list(q), zeros):
                    result = node.loop.tick(now)
                    node._publish(result, time.perf_counter())
                    results.append(result)
                time.sleep(0.01)
            return results

        assert all(not r.safe for r in ticks(60))
        assert wait_for_steps(node, ticks)
        values = node.loop.diagnostics(time.time()).values
        assert values["maml.process_state"] == "running" and int(values["maml.steps"]) >= 1
        os.kill(policy.process.info.pid, signal.SIGKILL)
        time.sleep(0.3)
        after = ticks(20)
        assert len(after) == 20 and all(not r.safe for r in after)  # still the policy's
        report = node.loop.diagnostics(time.time())
        assert report.level == "warn" and "adaptation process" in report.message
        assert report.values["maml.process_state"] == "dead"
        node._publish_diagnostics()
        assert any(level == "warning" and "adaptation process" in message
                   for level, message in logged), logged
        assert time.time() - start < 60
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    assert policy.process.info.state == "closed"


def wait_for_steps(node, ticks, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ticks(10)
        if node.policy.process.steps >= 1:
            return True
    return False


def test_uncorrected_fast_path_gives_what_the_formula_gives() -> None:
    """With nothing held, apply skips the correction's arithmetic; it must give what the
    formula gives (an offset of zero), and keep the lag gate's mean as the formula does."""
    settings = correction_settings(toy_torque_model().float(), 0.5, 0.002)
    fast, formula = CorrectionApplier(settings), CorrectionApplier(settings)
    assert fast.held.identity
    formula.held.__dict__["identity"] = False  # the same numbers, through the formula
    assert not formula.held.identity  # (the cached property's slot: a wrong key tests nothing)
    rng = np.random.default_rng(0)
    for i in range(200):
        obs = rng.normal(size=8).astype(np.float32)
        if i % 50 == 7:
            obs[5] = np.nan  # a bad velocity reading: the formula's path (NaN stays NaN)
        action = rng.uniform(-1.5, 1.5, size=2).astype(np.float32)
        np.testing.assert_array_equal(fast.apply(obs, action), formula.apply(obs, action))
        np.testing.assert_array_equal(fast.mean_lag, formula.mean_lag)
