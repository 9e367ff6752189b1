"""The adapter's control loop without ROS: what the ROS nodes run, message types aside.

The ROS nodes (:mod:`metarl_ros.nodes.adapter_node`, and the ONNX deploy node) only translate
messages to and from the plain values used here, so everything that decides *what* to command
is testable without DDS:

* :class:`JointNameMapper` -- joints matched **by name**, in any order, extra joints ignored;
  wrong lengths, missing joints and non-finite values are rejected (:class:`RejectedInput`).
* :class:`Watchdog` -- age of the latest accepted message.
* :class:`EffortClamp` -- checks the policy's action (shape, finite) and clips it to
  [-1, 1]; clamps efforts to the effort limits; never emits a non-finite value. The efforts
  themselves come from :func:`~metarl_ros.control.law.effort_command` (the env's fixed PD feedback
  on the reference plus ``action * action_scale``), as in training.
* :class:`SafeAction` -- what is commanded when the policy cannot be trusted: ``zero`` effort
  (the robot's own gravity compensation keeps running) or ``hold``, a PD to the position
  latched when safe mode began.
* :class:`AdaptiveController` -- ties them together around an
  :class:`~metarl_ros.control.policy_interface.AdaptivePolicy`: builds the observation with
  :func:`~metarl_ros.control.law.build_observation` and the (s, a, r, s') transitions with
  :func:`~metarl_ros.control.law.tracking_reward` (never re-implemented here), decides when a
  control tick is due, catches every policy failure, and keeps the diagnostics.
* :class:`LogThrottle` -- at most one log line per key and period, counting what it swallowed.

**Timing model.** Control is *sensor-triggered*: a tick runs when a joint state arrives whose
stamp reaches the next point of a grid spaced one control period apart (joint states faster
than the control rate are decimated; slower ones make the loop run at their rate). With
``reference_sync`` the tick also waits for a reference stamped no earlier than that joint
state, so in lockstep simulation the result does not depend on which of the two messages
arrives first. A control tick calls ``policy.observe`` (the transition that ended now) and
``policy.act`` only; the context update (:meth:`AdaptiveController.update_context`) runs
separately at its own rate.

**Staleness** is measured on the caller's clock (ROS time: simulation time when
``use_sim_time`` is on) from the *receipt* of the latest accepted joint state and reference;
an input that has not arrived yet counts from the first receipt of the other one (so a
reference following its joint state by a few milliseconds at start-up is not "stale").
:meth:`AdaptiveController.watchdog` is meant to be polled by a timer; while data are stale it
returns the safe command to publish every control period.

Times are in seconds (float). Arrays are float64 in the contract's joint order unless stated.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from metarl_ros.control.diagnostics import DiagnosticsReport, LatencyWindow, LoopStats
from metarl_ros.control.joint_map import JointNameMapper, JointSample, RejectedInput
from metarl_ros.control.law import ControlLaw, build_observation, effort_command, tracking_reward
from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.control.safety import EffortClamp, SafeAction
from metarl_ros.control.watchdog import Watchdog


@dataclass(frozen=True)
class TickResult:
    """What one control tick (or watchdog period) commands."""

    efforts: np.ndarray
    """N*m, contract joint order, clamped to the limits."""
    action: np.ndarray
    """the policy's normalized action as applied (clipped to [-1, 1]); zeros when safe."""
    safe: bool
    reason: str
    """'' for a policy command, else why the safe action was used."""
    compute_s: float = 0.0
    """wall time spent in observe + act."""
    error: str = ""
    """the policy's exception (or bad output), for the caller's throttled log."""


@dataclass(frozen=True)
class LatentUpdate:
    mean: np.ndarray
    std: np.ndarray
    window_fill: int
    shift: float
    """||mean - previous mean||_2 (latent units) since the previous context update."""
    adaptation_event: bool
    """the mean moved more than the threshold, in posterior std units, from the reference."""


# ------------------------------------------------------------------------------------------
# The controller


@dataclass(frozen=True)
class LoopConfig:
    """Settings of :class:`AdaptiveController` (the adapter node's parameters)."""

    control_rate_hz: float = 100.0
    watchdog_timeout_s: float = 0.1
    safe_mode: str = "zero"
    hold_kp: tuple[float, ...] = ()
    hold_kd: tuple[float, ...] = ()
    reference_sync: bool = True
    late_tick_fraction: float = 0.5
    """a tick whose compute time exceeds this fraction of the control period is late."""
    adaptation_event_threshold: float = 1.0
    """latent-mean move, in posterior std, that counts as an adaptation event."""
    latency_window: int = 2000
    effort_limit_scale: float = 1.0
    """efforts are clamped to ``effort_limit_scale * effort_limits`` (in (0, 1]: tighter
    limits for first trials on hardware)."""


class AdaptiveController:
    """The control loop around an :class:`~metarl_ros.control.policy_interface.AdaptivePolicy`.

    Thread-safety: the control-path methods (``on_joint_state``, ``on_reference``, ``tick``,
    ``watchdog``) must be called from one thread at a time; ``update_context`` and
    ``diagnostics`` may run on another thread. The protocol does not promise a thread-safe
    policy, so policy calls are serialized by a lock: ``observe``/``act`` (control) never run
    at the same time as ``update_context()``/``posterior()`` (context). Those two must
    therefore be cheap; heavy adaptation belongs in the policy's own background thread.

    Args:
        law: the control law (observation, reward, efforts) the policy was trained with: an
            env setup's ``law``.
        policy: the controller.
        config: loop settings.
        joint_names: joint order of the policy (default: the law's).
    """

    def __init__(self, law: ControlLaw, policy: AdaptivePolicy, config: LoopConfig,
                 joint_names: Sequence[str] | None = None) -> None:
        self.law = law
        self.policy = policy
        self.config = config
        names = tuple(joint_names) if joint_names is not None else law.joint_names
        self.n = len(names)
        if self.n != law.num_joints:
            raise ValueError(f"{self.n} joint names, but the law has {law.num_joints} joints")
        if not config.control_rate_hz > 0:
            raise ValueError("control_rate_hz must be > 0")
        self.period_s = 1.0 / config.control_rate_hz
        self.joints = JointNameMapper(names)
        self.references = JointNameMapper(names, allow_unnamed=True)
        if not 0.0 < config.effort_limit_scale <= 1.0:
            raise ValueError("effort_limit_scale must be in (0, 1], got "
                             f"{config.effort_limit_scale}")
        self.clamp = EffortClamp(law.action_scale,
                                 np.asarray(law.effort_limits) * config.effort_limit_scale)
        self.safe = SafeAction(config.safe_mode, config.hold_kp or (0.0,) * self.n,
                               config.hold_kd or (0.0,) * self.n, self.clamp)
        self.joint_watchdog = Watchdog(config.watchdog_timeout_s)
        self.reference_watchdog = Watchdog(config.watchdog_timeout_s)
        self.stats = LoopStats()
        self.latency = LatencyWindow(config.latency_window)
        self._lock = threading.Lock()
        self._policy_lock = threading.Lock()
        self._sample: JointSample | None = None
        self._sample_stamp: float | None = None
        self._reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reference_stamp: float | None = None
        self._next_due: float | None = None
        self._last_tick_stamp: float | None = None
        self._pending_stamp: float | None = None
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self._last_action = np.zeros(self.n)
        self._safe_reason = ""
        self._tick_late = False
        self._repeat = False
        self._last_result: TickResult | None = None
        self._watchdog_next: float | None = None
        self._latent_reference: np.ndarray | None = None
        self._latent_previous: np.ndarray | None = None
        self._latent: LatentUpdate | None = None

    # ----------------------------------------------------------------- inputs

    def _reject(self, kind: str, error: RejectedInput) -> None:
        with self._lock:
            if kind == "joint_state":
                self.stats.rejected_joint_states += 1
            else:
                self.stats.rejected_references += 1
            key = f"{kind}:{error.reason}"
            self.stats.rejections_by_reason[key] = self.stats.rejections_by_reason.get(key, 0) + 1
            self.stats.last_rejection = f"{kind}: {error}"

    def on_joint_state(self, stamp_s: float, now_s: float, names: Sequence[str],
                       position: Sequence[float], velocity: Sequence[float],
                       effort: Sequence[float] | None = None) -> bool:
        """Take a joint state; return True if a control tick is due now.

        ``stamp_s`` is the message's stamp (0 if unset: ``now_s`` is used instead),
        ``now_s`` the receipt time on the loop's clock. Raises :class:`RejectedInput` (after
        counting it) if the message is unusable; the previous sample is then kept.
        """
        try:
            sample = self.joints.map(names, position, velocity, effort)
        except RejectedInput as error:
            self._reject("joint_state", error)
            raise
        stamp = stamp_s if stamp_s > 0.0 else now_s
        self._sample, self._sample_stamp = sample, stamp
        self.joint_watchdog.feed(now_s)
        self.reference_watchdog.arm(now_s)  # from now on a missing reference goes stale
        if stamp == self._last_tick_stamp and self._last_result is not None:
            # The same instant again (a lockstep simulator re-publishing it because our
            # command got lost before it was discovered): answer it again, idempotently.
            self._repeat = True
            return True
        if self._next_due is not None and stamp < self._next_due - 0.1 * self.period_s:
            return False  # decimated: not yet the next control instant
        if self._next_due is None or stamp > self._next_due + self.period_s:
            self._next_due = stamp  # first tick, or resynchronise after a gap
        self._next_due += self.period_s
        self._pending_stamp = stamp
        return self._reference_ready()

    def on_reference(self, stamp_s: float, now_s: float, names: Sequence[str],
                     position: Sequence[float], velocity: Sequence[float],
                     acceleration: Sequence[float]) -> bool:
        """Take a reference (q_ref, qd_ref, qdd_ref); return True if a deferred tick is due."""
        try:
            sample = self.references.map(names, position, velocity, acceleration,
                                         require_effort=True)
        except RejectedInput as error:
            self._reject("reference", error)
            raise
        assert sample.effort is not None
        self._reference = (sample.position, sample.velocity, sample.effort)
        self._reference_stamp = stamp_s if stamp_s > 0.0 else now_s
        self.reference_watchdog.feed(now_s)
        self.joint_watchdog.arm(now_s)
        return self._pending_stamp is not None and self._reference_ready()

    def _reference_ready(self) -> bool:
        if self._reference is None:
            return False
        if not self.config.reference_sync or self._pending_stamp is None:
            return True
        assert self._reference_stamp is not None
        return self._reference_stamp >= self._pending_stamp - 1e-9

    # ----------------------------------------------------------------- control

    def _stale_reason(self, now_s: float) -> str:
        if self.joint_watchdog.stale(now_s):
            return "sensor_stale"
        if self.reference_watchdog.stale(now_s):
            return "reference_stale"
        return ""

    def _safe_result(self, reason: str, error: str = "", compute_s: float = 0.0) -> TickResult:
        if not self._safe_reason:
            self.safe.latch(None if self._sample is None else self._sample.position)
            if reason in ("sensor_stale", "reference_stale"):
                self.stats.stale_events += 1
        self._safe_reason = reason
        efforts = self.safe.efforts(self._sample)
        action = np.zeros(self.n)  # no policy action: the next observation says so
        self._last_action = action
        self._previous = None  # a transition needs the policy's own action at both ends
        self.stats.safe_ticks += 1
        return TickResult(efforts, action, True, reason, compute_s, error)

    def tick(self, now_s: float) -> TickResult:
        """Run one control tick on the latest joint state and reference.

        Call when :meth:`on_joint_state` or :meth:`on_reference` returned True. Never raises
        because of the policy: failures give the safe action (``TickResult.error`` says why).
        """
        if self._repeat and self._last_result is not None:
            self._repeat = False
            return self._last_result
        result = self._tick(now_s)
        self._last_result = result
        return result

    def _tick(self, now_s: float) -> TickResult:
        stamp = self._pending_stamp if self._pending_stamp is not None else now_s
        self._pending_stamp = None
        with self._lock:
            self.stats.ticks += 1
            # a gap explained by stale inputs is reported as such, not as a late tick
            late_gap = (self._last_tick_stamp is not None
                        and self._safe_reason not in ("sensor_stale", "reference_stale")
                        and stamp - self._last_tick_stamp > 1.5 * self.period_s)
        self._last_tick_stamp = stamp
        self._watchdog_next = None
        reason = self._stale_reason(now_s)
        if self._sample is None or self._reference is None:
            reason = reason or "no_data"
        if reason:
            result = self._safe_result(reason)
            self._count_late(late_gap, 0.0)
            return result
        assert self._sample is not None and self._reference is not None
        sample, reference = self._sample, self._reference
        start = time.perf_counter()
        try:
            with self._policy_lock:
                obs = build_observation(self.law, sample.position, sample.velocity,
                                        reference, self._last_action.astype(np.float32))
                if self._previous is not None:
                    prev_obs, prev_action = self._previous
                    error = float(np.linalg.norm(reference[0] - sample.position))
                    reward = tracking_reward(self.law, error, prev_action)
                    self.policy.observe(prev_obs, prev_action.astype(np.float32), reward, obs)
                    self.stats.transitions += 1
                applied = self.clamp.check_action(self.policy.act(obs))
            efforts = self.clamp.clamp(effort_command(self.law, applied, sample.position,
                                                      sample.velocity, reference))
        except Exception as exc:  # noqa: BLE001 - the loop must survive any policy failure
            compute = time.perf_counter() - start
            with self._lock:
                self.stats.policy_errors += 1
                self.stats.last_policy_error = f"{type(exc).__name__}: {exc}"
            result = self._safe_result("policy_error", self.stats.last_policy_error, compute)
            self._count_late(late_gap, compute)
            return result
        compute = time.perf_counter() - start
        self.latency.add(compute)
        if self._safe_reason:
            self.safe.release()
            self._safe_reason = ""
        self._previous = (obs, applied)
        self._last_action = applied
        self.stats.policy_ticks += 1
        self._count_late(late_gap, compute)
        return TickResult(efforts, applied, False, "", compute)

    def _count_late(self, late_gap: bool, compute_s: float) -> None:
        self._tick_late = late_gap or compute_s > self.config.late_tick_fraction * self.period_s
        if self._tick_late:
            with self._lock:
                self.stats.late_ticks += 1

    def record_publish_latency(self, seconds: float) -> None:
        """Count the last tick as late if receipt-to-publish took longer than its budget.

        For callers that measure more than the policy's compute time (message conversion,
        publishing); call once per tick, after :meth:`tick`. A tick is counted once.
        """
        if not self._tick_late and seconds > self.config.late_tick_fraction * self.period_s:
            self._tick_late = True
            with self._lock:
                self.stats.late_ticks += 1

    def watchdog(self, now_s: float) -> TickResult | None:
        """Poll from a timer. While inputs are stale, return the safe command once per period.

        Returns ``None`` when nothing needs publishing (inputs fresh, or not yet a period
        since the last command).
        """
        reason = self._stale_reason(now_s)
        if not reason:
            return None
        if self.joint_watchdog.last_s is None and self.reference_watchdog.last_s is None:
            return None  # nothing ever arrived: not started yet, do not spam commands
        if self._watchdog_next is not None and now_s < self._watchdog_next:
            return None
        self._watchdog_next = now_s + self.period_s
        with self._lock:
            self.stats.ticks += 1
        return self._safe_result(reason)

    @property
    def last_tick_stamp(self) -> float | None:
        """Stamp (s) of the instant the latest tick answered (also a repeated answer's)."""
        return self._last_tick_stamp

    @property
    def latest_position(self) -> np.ndarray | None:
        """Positions (contract order) of the latest accepted joint state; None before one."""
        return None if self._sample is None else self._sample.position

    @property
    def safe_reason(self) -> str:
        """'' while the policy is in control, else why the safe action is in force."""
        return self._safe_reason

    # ----------------------------------------------------------------- context

    def update_context(self, now_s: float) -> LatentUpdate | None:
        """Run the policy's context update (if it has ``update_context()``), read the posterior.

        Returns ``None`` if the policy failed (counted) or has no latent.
        """
        try:
            with self._policy_lock:
                update = getattr(self.policy, "update_context", None)
                if callable(update):
                    update()
                posterior = self.policy.posterior()
            mean = np.asarray(posterior.mean, dtype=np.float64).reshape(-1)
            std = np.asarray(posterior.std, dtype=np.float64).reshape(-1)
        except Exception as exc:  # noqa: BLE001
            with self._lock:
                self.stats.context_errors += 1
                self.stats.last_policy_error = f"context: {type(exc).__name__}: {exc}"
            return None
        if mean.size == 0:
            return None
        shift = 0.0 if self._latent_previous is None else float(
            np.linalg.norm(mean - self._latent_previous))
        self._latent_previous = mean
        event = False
        if self._latent_reference is None:
            self._latent_reference = mean
        else:
            scale = np.maximum(std, 1e-6)
            moved = float(np.linalg.norm((mean - self._latent_reference) / scale))
            moved /= math.sqrt(mean.size)
            if moved > self.config.adaptation_event_threshold:
                event = True
                self._latent_reference = mean
                with self._lock:
                    self.stats.adaptation_events += 1
                    self.stats.last_adaptation_s = now_s
        self._latent = LatentUpdate(mean, std, int(posterior.window_fill), shift, event)
        return self._latent

    def close(self) -> None:
        """Stop the policy's background work (calls ``policy.close()`` if it has one)."""
        close = getattr(self.policy, "close", None)
        if callable(close):
            with self._policy_lock:
                close()

    # ----------------------------------------------------------------- diagnostics

    def diagnostics(self, now_s: float) -> DiagnosticsReport:
        """Values for ``/diagnostics`` (all as strings, as DiagnosticStatus wants them)."""
        with self._lock:
            s = LoopStats(**{**self.stats.__dict__,
                             "rejections_by_reason": dict(self.stats.rejections_by_reason)})
        latent = self._latent
        late_pct = 100.0 * s.late_ticks / s.ticks if s.ticks else 0.0
        values: dict[str, Any] = {
            "state": self._safe_reason or "policy",
            "safe_mode": self.config.safe_mode,
            "control_rate_hz": self.config.control_rate_hz,
            "ticks": s.ticks,
            "policy_ticks": s.policy_ticks,
            "safe_ticks": s.safe_ticks,
            "late_ticks": s.late_ticks,
            "late_tick_pct": f"{late_pct:.2f}",
            "inference_latency_p50_ms": f"{self.latency.percentile_ms(50):.3f}",
            "inference_latency_p99_ms": f"{self.latency.percentile_ms(99):.3f}",
            "inference_latency_max_ms": f"{self.latency.max_ms():.3f}",
            "transitions": s.transitions,
            "window_fill": latent.window_fill if latent else 0,
            "latent_dim": latent.mean.size if latent else 0,
            "latent_shift": f"{latent.shift:.4f}" if latent else "0",
            "adaptation_events": s.adaptation_events,
            "last_adaptation_s": f"{s.last_adaptation_s:.3f}",
            "policy_errors": s.policy_errors,
            "context_errors": s.context_errors,
            "last_policy_error": s.last_policy_error,
            "stale_events": s.stale_events,
            "joint_state_age_s": f"{self.joint_watchdog.age(now_s):.3f}",
            "reference_age_s": f"{self.reference_watchdog.age(now_s):.3f}",
            "rejected_joint_states": s.rejected_joint_states,
            "rejected_references": s.rejected_references,
            "last_rejection": s.last_rejection,
        }
        for key, count in sorted(s.rejections_by_reason.items()):
            values[f"rejected.{key}"] = count
        if self._safe_reason:
            level, message = "error", f"safe action ({self.config.safe_mode}): {self._safe_reason}"
        elif s.policy_errors or s.context_errors:
            level, message = "warn", f"policy errors: {s.policy_errors + s.context_errors}"
        elif s.ticks and late_pct > 5.0:
            level, message = "warn", f"{late_pct:.1f}% late ticks"
        else:
            level, message = "ok", "policy in control"
        return DiagnosticsReport(level, message, {k: str(v) for k, v in values.items()})
