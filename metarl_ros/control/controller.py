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

**Bad stamps never silence the loop.** A stamp farther than ``max_stamp_offset_s`` from the
caller's clock is rejected (reason ``stamp_offset``, with a hint when one side looks like
simulated time and the other like wall-clock time: a ``use_sim_time`` mismatch), so the
watchdog commands the safe action and says why. A stamp older than the last tick's resets the
tick grid (counted in ``stamp_jumps``), and so does a stamp grid that has decimated every joint
state for more than 1.5 control periods of the caller's clock, so a single stamp from the future
cannot make the loop skip the good messages that follow. A tick waiting for its reference
(``reference_sync``) longer than the watchdog timeout gives the safe action too.

**Staleness** is measured on the caller's clock (ROS time: simulation time when
``use_sim_time`` is on) from the *receipt* of the latest accepted joint state and reference;
an input that has not arrived yet counts from the first receipt of the other one (so a
reference following its joint state by a few milliseconds at start-up is not "stale").
:meth:`AdaptiveController.watchdog` is meant to be polled by a timer; while data are stale it
returns the safe command to publish every control period (a poll half a period after the
previous safe command counts, so the polling timer's jitter does not skip periods). If nothing
is commanded for a while on the wall clock (``idle_after_s``) -- before any input, or while the
caller's clock stands still, e.g. a paused simulation under ``use_sim_time`` --
:meth:`AdaptiveController.diagnostics` reports ``idle``, not "policy in control".

Times are in seconds (float). Arrays are float64 in the contract's joint order unless stated.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

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
    detail: str = ""
    """for a safe result: why, in words (e.g. which stamps were rejected and the likely cause)."""


@dataclass(frozen=True)
class LatentUpdate:
    mean: np.ndarray
    std: np.ndarray
    window_fill: int
    shift: float
    """||mean - previous mean||_2 (latent units) since the previous context update."""
    adaptation_event: bool
    """``moved`` exceeded the threshold (the reference then moves to the current mean)."""
    moved: float = 0.0
    """what is compared with ``adaptation_event_threshold``: the RMS over latent dimensions of
    (mean - reference mean) / posterior std, the reference being the mean at the previous
    adaptation event (or the first update)."""


# ------------------------------------------------------------------------------------------
# The controller

#: safe-command reasons meaning "no usable input": a gap they explain is not a late tick.
STALE_REASONS: tuple[str, ...] = ("sensor_stale", "reference_stale", "stamp_offset",
                                  "reference_behind")


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
    max_stamp_offset_s: float = 1.0
    """inputs stamped farther than this from the caller's clock are rejected (0 = no check)."""
    max_message_joints: int = 1024
    """inputs with more entries than this are rejected before any per-entry work."""
    idle_after_s: float = 1.0
    """wall seconds without any command after which diagnostics report ``idle``."""


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
        wall_clock: monotonic wall time (s), for the ``idle`` diagnosis only.
    """

    def __init__(self, law: ControlLaw, policy: AdaptivePolicy, config: LoopConfig,
                 joint_names: Sequence[str] | None = None,
                 wall_clock: Callable[[], float] = time.monotonic) -> None:
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
        self.joints = JointNameMapper(names, max_entries=config.max_message_joints)
        self.references = JointNameMapper(names, allow_unnamed=True,
                                          max_entries=config.max_message_joints)
        self.clamp, self.safe = self._safety(config.safe_mode, config.effort_limit_scale)
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
        self._wall = wall_clock
        self._start_wall = wall_clock()
        self._last_command_wall: float | None = None
        self._last_command_now: float | None = None
        self._last_tick_now: float | None = None
        self._pending_since: float | None = None
        self._safe_detail = ""
        self._last_rejection: dict[str, tuple[float, RejectedInput]] = {}

    # ----------------------------------------------------------------- live settings

    def _safety(self, mode: str, scale: float) -> tuple[EffortClamp, SafeAction]:
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"effort_limit_scale must be in (0, 1], got {scale}")
        clamp = EffortClamp(self.law.action_scale, np.asarray(self.law.effort_limits) * scale)
        safe = SafeAction(mode, self.config.hold_kp or (0.0,) * self.n,
                          self.config.hold_kd or (0.0,) * self.n, clamp)
        return clamp, safe

    def set_effort_limit_scale(self, scale: float) -> None:
        """Clamp efforts to ``scale`` (in (0, 1]) times the effort limits from the next command
        on. Raises ``ValueError`` (nothing changed) for a value out of range."""
        clamp, safe = self._safety(self.config.safe_mode, float(scale))
        safe.hold_position = self.safe.hold_position
        self.clamp, self.safe = clamp, safe
        self.config = replace(self.config, effort_limit_scale=float(scale))

    def set_safe_mode(self, mode: str) -> None:
        """Use safe action ``mode`` (``zero`` or ``hold``) from the next safe command on; a
        hold already in force keeps its latched position. Raises ``ValueError`` (nothing
        changed) for an unknown mode."""
        _, safe = self._safety(mode, self.config.effort_limit_scale)
        safe.hold_position = self.safe.hold_position
        if self._safe_reason and safe.hold_position is None and self._sample is not None:
            safe.latch(self._sample.position)
        self.safe = safe
        self.config = replace(self.config, safe_mode=mode)

    # ----------------------------------------------------------------- inputs

    def _reject(self, kind: str, error: RejectedInput, now_s: float) -> None:
        self._last_rejection[kind] = (now_s, error)
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
        stamp = stamp_s if stamp_s > 0.0 else now_s
        try:
            sample = self.joints.map(names, position, velocity, effort)
            self._check_stamp("joint state", stamp, now_s)
        except RejectedInput as error:
            self._reject("joint_state", error, now_s)
            raise
        self._sample, self._sample_stamp = sample, stamp
        self.joint_watchdog.feed(now_s)
        self.reference_watchdog.arm(now_s)  # from now on a missing reference goes stale
        if stamp == self._last_tick_stamp and self._last_result is not None:
            # The same instant again (a lockstep simulator re-publishing it because our
            # command got lost before it was discovered): answer it again, idempotently.
            self._repeat = True
            return True
        last = self._last_tick_stamp
        if last is not None and stamp < last:
            self._stamp_jump(f"joint state stamps went back {last - stamp:.3f} s "
                             f"(from {last:.3f} s to {stamp:.3f} s)")
        elif self._next_due is not None and stamp < self._next_due - 0.1 * self.period_s:
            if self._last_tick_now is None or now_s - self._last_tick_now < 1.5 * self.period_s:
                return False  # decimated: not yet the next control instant
            self._stamp_jump(f"joint state stamp {stamp:.3f} s is {self._next_due - stamp:.3f} s "
                             f"before the next control instant after "
                             f"{now_s - self._last_tick_now:.3f} s without a tick")
        if self._next_due is None or stamp > self._next_due + self.period_s:
            self._next_due = stamp  # first tick, or resynchronise after a gap
        self._next_due += self.period_s
        if self._pending_stamp is None:
            self._pending_since = now_s
        self._pending_stamp = stamp
        return self._reference_ready()

    def _stamp_jump(self, what: str) -> None:
        """The stamp grid no longer fits the stamps: start a new one at this message."""
        self._next_due = None
        with self._lock:
            self.stats.stamp_jumps += 1
            self.stats.last_stamp_jump = f"{what}; control resynchronised"

    def _check_stamp(self, kind: str, stamp: float, now_s: float) -> None:
        limit = self.config.max_stamp_offset_s
        if limit > 0.0 and abs(stamp - now_s) > limit:
            raise RejectedInput("stamp_offset", describe_stamp_offset(kind, stamp, now_s, limit))

    def on_reference(self, stamp_s: float, now_s: float, names: Sequence[str],
                     position: Sequence[float], velocity: Sequence[float],
                     acceleration: Sequence[float]) -> bool:
        """Take a reference (q_ref, qd_ref, qdd_ref); return True if a deferred tick is due."""
        stamp = stamp_s if stamp_s > 0.0 else now_s
        try:
            sample = self.references.map(names, position, velocity, acceleration,
                                         require_effort=True)
            self._check_stamp("reference", stamp, now_s)
        except RejectedInput as error:
            self._reject("reference", error, now_s)
            raise
        assert sample.effort is not None
        self._reference = (sample.position, sample.velocity, sample.effort)
        self._reference_stamp = stamp
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

    def _stale_reason(self, now_s: float) -> tuple[str, str]:
        """``(reason, detail)`` of the safe action the inputs call for now; ``("", "")`` if
        none. Inputs that keep arriving but are rejected for their stamps are named as such."""
        for kind, dog, stale in (("joint_state", self.joint_watchdog, "sensor_stale"),
                                 ("reference", self.reference_watchdog, "reference_stale")):
            if not dog.stale(now_s):
                continue
            what = kind.replace("_", " ")
            rejected = self._last_rejection.get(kind)
            if rejected is not None and (dog.last_s is None or rejected[0] >= dog.last_s):
                # the latest one to arrive was rejected: that, not silence, is the cause
                when, error = rejected
                reason = "stamp_offset" if error.reason == "stamp_offset" else stale
                ago = (f" (received {now_s - when:.3f} s ago)" if now_s - when > dog.timeout_s
                       else "")
                return reason, f"the latest {what}{ago} was rejected: {error}"
            if dog.last_s is None and dog.armed_s is None:
                return stale, f"no {what} received yet"
            return stale, f"no {what} for {dog.age(now_s):.3f} s"
        if (self._pending_stamp is not None and self._pending_since is not None
                and now_s - self._pending_since > self.config.watchdog_timeout_s):
            behind = ("none" if self._reference_stamp is None
                      else f"{self._pending_stamp - self._reference_stamp:.3f} s behind")
            return "reference_behind", (
                f"the tick at {self._pending_stamp:.3f} s has waited "
                f"{now_s - self._pending_since:.3f} s for a reference stamped no earlier "
                f"(latest reference: {behind}; reference_sync)")
        return "", ""

    def _safe_result(self, reason: str, error: str = "", compute_s: float = 0.0,
                     detail: str = "", now_s: float | None = None) -> TickResult:
        if not self._safe_reason:
            self.safe.latch(None if self._sample is None else self._sample.position)
            if reason in STALE_REASONS:
                self.stats.stale_events += 1
        self._safe_reason = reason
        self._safe_detail = detail or error
        efforts = self.safe.efforts(self._sample)
        action = np.zeros(self.n)  # no policy action: the next observation says so
        self._last_action = action
        self._previous = None  # a transition needs the policy's own action at both ends
        self.stats.safe_ticks += 1
        self._commanded(now_s)
        return TickResult(efforts, action, True, reason, compute_s, error, self._safe_detail)

    def _commanded(self, now_s: float | None) -> None:
        self._last_command_wall = self._wall()
        if now_s is not None:
            self._last_command_now = now_s

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
        self._pending_since = None
        with self._lock:
            self.stats.ticks += 1
            # a gap explained by stale inputs is reported as such, not as a late tick
            late_gap = (self._last_tick_stamp is not None
                        and self._safe_reason not in STALE_REASONS
                        and stamp - self._last_tick_stamp > 1.5 * self.period_s)
        self._last_tick_stamp = stamp
        self._last_tick_now = now_s
        self._watchdog_next = None
        reason, detail = self._stale_reason(now_s)
        if self._sample is None or self._reference is None:
            reason = reason or "no_data"
        if reason:
            result = self._safe_result(reason, detail=detail, now_s=now_s)
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
            result = self._safe_result("policy_error", self.stats.last_policy_error, compute,
                                       now_s=now_s)
            self._count_late(late_gap, compute)
            return result
        compute = time.perf_counter() - start
        self.latency.add(compute)
        if self._safe_reason:
            self.safe.release()
            self._safe_reason = ""
            self._safe_detail = ""
        self._commanded(now_s)
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
        since the last command). A poll at least half a period after the previous safe
        command publishes, so a timer polling once per control period publishes at every poll
        despite its jitter (not at every other poll), and never twice in half a period.
        """
        reason, detail = self._stale_reason(now_s)
        if not reason:
            return None
        if (self.joint_watchdog.last_s is None and self.reference_watchdog.last_s is None
                and not self._last_rejection):
            return None  # nothing ever arrived: not started yet, do not spam commands
        if self._watchdog_next is not None and now_s < self._watchdog_next:
            return None
        self._watchdog_next = now_s + 0.5 * self.period_s
        if reason == "reference_behind":
            self._pending_stamp = self._pending_since = None  # given up: answered safely
        with self._lock:
            self.stats.ticks += 1
        return self._safe_result(reason, detail=detail, now_s=now_s)

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

    @property
    def safe_detail(self) -> str:
        """The safe action's cause in words ('' while the policy is in control)."""
        return self._safe_detail

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
        moved = 0.0
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
        self._latent = LatentUpdate(mean, std, int(posterior.window_fill), shift, event, moved)
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
        idle = self._idle(now_s)
        state = self._safe_reason or ("idle" if idle else "policy")
        values: dict[str, Any] = {
            "state": state,
            "safe_detail": self._safe_detail if self._safe_reason else idle,
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
            "latent_moved_std": f"{latent.moved:.3f}" if latent else "0",
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
            "stamp_jumps": s.stamp_jumps,
            "last_stamp_jump": s.last_stamp_jump,
        }
        for key, count in sorted(s.rejections_by_reason.items()):
            values[f"rejected.{key}"] = count
        if self._safe_reason:
            level, message = "error", f"safe action ({self.config.safe_mode}): {self._safe_reason}"
            if self._safe_detail:
                message += f": {self._safe_detail}"
        elif idle:
            level, message = "warn", idle
        elif s.policy_errors or s.context_errors:
            level, message = "warn", f"policy errors: {s.policy_errors + s.context_errors}"
        elif s.ticks and late_pct > 5.0:
            level, message = "warn", f"{late_pct:.1f}% late ticks"
        else:
            level, message = "ok", "policy in control"
        return DiagnosticsReport(level, message, {k: str(v) for k, v in values.items()})

    def _idle(self, now_s: float) -> str:
        """Why nothing has been commanded for ``idle_after_s`` wall seconds, or ''."""
        since = self._last_command_wall
        wall_s = self._wall() - (self._start_wall if since is None else since)
        if wall_s <= self.config.idle_after_s:
            return ""
        if since is None:
            return f"no command yet after {wall_s:.1f} s: waiting for joint states and reference"
        if self._last_command_now is not None and now_s <= self._last_command_now:
            return (f"no command for {wall_s:.1f} s (wall): this node's clock stands at "
                    f"{now_s:.3f} s (simulated time paused?)")
        return f"no command for {wall_s:.1f} s (wall)"


def describe_stamp_offset(kind: str, stamp: float, now_s: float, limit: float) -> str:
    """Why a stamp is too far from the node's clock, naming a likely ``use_sim_time`` mix-up.

    Wall-clock stamps are > 1e9 s (after 2001); simulated time starts near 0.
    """
    offset = stamp - now_s
    text = (f"{kind} stamp {stamp:.3f} s is {abs(offset):.4g} s "
            f"{'ahead of' if offset > 0 else 'behind'} this node's clock ({now_s:.3f} s; "
            f"max_stamp_offset {limit:g} s)")
    wall = 1e9
    if now_s == 0.0:
        return text + ("; this node's clock is at 0: use_sim_time is on but no /clock has "
                       "arrived")
    if stamp < wall <= now_s:
        return text + ("; the publisher stamps simulated time (/clock) but this node runs on "
                       "wall-clock time: start it with use_sim_time:=true")
    if now_s < wall <= stamp:
        return text + ("; the publisher stamps wall-clock time but this node runs on simulated "
                       "time (use_sim_time:=true): start it without use_sim_time, or make the "
                       "publisher follow /clock")
    return text
