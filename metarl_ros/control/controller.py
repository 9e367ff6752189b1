"""The adapter's control loop without ROS: what the ROS nodes run, message types aside.

The ROS nodes (:mod:`metarl_ros.nodes.adapter_node`, and the ONNX deploy node) only translate
messages to and from the plain values used here, so everything that decides *what* to command
is testable without DDS.

:class:`AdaptiveController` (settings :class:`~metarl_ros.control.loop_types.LoopConfig`,
results :class:`~metarl_ros.control.loop_types.TickResult`) ties the pieces of
:mod:`metarl_ros.control` together around an
:class:`~metarl_ros.control.policy_interface.AdaptivePolicy`: joints matched by name
(:mod:`~metarl_ros.control.joint_map`), input watchdogs (:mod:`~metarl_ros.control.loop_inputs`),
the action check, effort clamp and safe action (:mod:`~metarl_ros.control.safety`), and what
is asked of the policy and when -- observations, (s, a, r, s') transitions, acting at the joint
state or ahead of it (:mod:`~metarl_ros.control.policy_calls`). It computes the efforts with
:func:`~metarl_ros.control.law.effort_command` (the env's fixed PD feedback on the reference
plus ``action * action_scale``, as in training), decides when a control tick is due
(:mod:`~metarl_ros.control.tick_timing`), catches every policy failure, and keeps the
diagnostics (:mod:`~metarl_ros.control.diagnostics`).

**Timing** (when a tick is due, the wait for the reference, bad stamps and resynchronisation)
is :mod:`~metarl_ros.control.tick_timing`'s. A control tick calls ``policy.observe`` (the
transition that ended now) and ``policy.act`` only (with ``act_ahead``: ``act`` when its
reference arrives, ``observe`` in :meth:`AdaptiveController.after_command`); the context update
(:meth:`AdaptiveController.update_context`) runs separately at its own rate. What depends on
the reference alone (the rigid-body model's features and feed-forward,
:func:`~metarl_ros.control.law.reference_terms`) is computed when the reference a tick will
use arrives, so it is off the joint state's path.

**Staleness** is measured on the caller's clock (ROS time: simulation time when
``use_sim_time`` is on) from the *receipt* of the latest accepted joint state and reference
(:mod:`~metarl_ros.control.loop_inputs`). :meth:`AdaptiveController.watchdog` is meant to be
polled by a timer; while data are stale it returns the safe command to publish every control
period (a poll half a period after the previous safe command counts, so the polling timer's
jitter does not skip periods). If nothing is commanded for a while on the wall clock
(``idle_after_s``) -- before any input, or while the caller's clock stands still, e.g. a paused
simulation under ``use_sim_time`` -- :meth:`AdaptiveController.diagnostics` reports ``idle``,
not "policy in control".

Times are in seconds (float). Arrays are float64 in the contract's joint order unless stated.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from metarl_ros.control.diagnostics import (
    DiagnosticsReport,
    LatencyWindow,
    LoopStats,
    idle_reason,
    loop_report,
)
from metarl_ros.control.joint_map import RejectedInput
from metarl_ros.control.latent import LatentTracker, LatentUpdate
from metarl_ros.control.impedance import ImpedanceCommand, impedance_command
from metarl_ros.control.law import ControlLaw, effort_command
from metarl_ros.control.loop_inputs import LoopInputs
from metarl_ros.control.loop_types import STALE_REASONS, LoopConfig, TickResult
from metarl_ros.control.policy_calls import PolicyCalls
from metarl_ros.control.policy_interface import AdaptivePolicy, PolicyStatus
from metarl_ros.control.prepared import Reference
from metarl_ros.control.safety import EffortClamp, SafeAction
from metarl_ros.control.tick_timing import TickTiming


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
        self.inputs = LoopInputs(names, config, self._count_rejection)
        self.joints, self.references = self.inputs.joints, self.inputs.references
        self.clamp, self.safe = self._safety(config.safe_mode, config.effort_limit_scale)
        self.stats = LoopStats()
        self.latency = LatencyWindow(config.latency_window)  # the policy's compute per action
        self.command_latency = LatencyWindow(config.latency_window)  # receipt to publish
        self._lock = threading.Lock()
        self.calls = PolicyCalls(law, policy, config.act_ahead, self._count_transition,
                                 self._count_policy_error)
        self.timing = TickTiming(self.period_s, config.reference_sync, self._stamp_jump)
        self._safe_reason = ""
        self._tick_late = False
        self._repeat = False
        self._last_result: TickResult | None = None
        self._watchdog_next: float | None = None
        self._latent_tracker = LatentTracker()
        self._latent: LatentUpdate | None = None
        self._wall = wall_clock
        self._start_wall = wall_clock()
        self._last_command_wall: float | None = None
        self._last_command_now: float | None = None
        self._safe_detail = ""
        self._tick_reference: Reference | None = None  # the reference the last tick used

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
        if self._safe_reason and safe.hold_position is None and self.inputs.sample is not None:
            safe.latch(self.inputs.sample.position)
        self.safe = safe
        self.config = replace(self.config, safe_mode=mode)

    # ----------------------------------------------------------------- inputs

    def _count_rejection(self, kind: str, error: RejectedInput) -> None:
        with self._lock:
            self.stats.count_rejection(kind, error)

    def on_joint_state(self, stamp_s: float, now_s: float, names: Sequence[str],
                       position: Sequence[float], velocity: Sequence[float],
                       effort: Sequence[float] | None = None) -> bool:
        """Take a joint state; return True if a control tick is due now.

        ``stamp_s`` is the message's stamp (0 if unset: ``now_s`` is used instead),
        ``now_s`` the receipt time on the loop's clock. Raises :class:`RejectedInput` (after
        counting it) if the message is unusable; the previous sample is then kept.
        """
        stamp = self.inputs.take_joint_state(stamp_s, now_s, names, position, velocity, effort)
        if stamp == self.timing.last_tick_stamp and self._last_result is not None:
            # The same instant again (a lockstep simulator re-publishing it because our
            # command got lost before it was discovered): answer it again, idempotently.
            self._repeat = True
            return True
        return self.timing.on_joint_state(stamp, now_s)

    def _stamp_jump(self, what: str) -> None:
        with self._lock:
            self.stats.stamp_jumps += 1
            self.stats.last_stamp_jump = f"{what}; control resynchronised"

    def on_reference(self, stamp_s: float, now_s: float, names: Sequence[str],
                     position: Sequence[float], velocity: Sequence[float],
                     acceleration: Sequence[float]) -> bool:
        """Take a reference (q_ref, qd_ref, qdd_ref); return True if a deferred tick is due."""
        stamp = self.inputs.take_reference(stamp_s, now_s, names, position, velocity,
                                           acceleration)
        instant = self.timing.reference_known_for(stamp)
        if instant is not None:
            self._prepare(instant)
        return self.timing.on_reference(stamp)

    def _reference_for(self, instant: float) -> Reference | None:
        """The reference a tick at ``instant`` uses: with ``reference_sync`` the newest
        stamped no later than it (a preview's later ones are kept for their own instants),
        else the newest."""
        if self.config.reference_sync:
            return self.inputs.reference_at(instant)
        return self.inputs.reference

    def _prepare(self, instant: float) -> None:
        """What the reference of ``instant`` allows before its joint state
        (:meth:`PolicyCalls.prepare`)."""
        reference = self._reference_for(instant)
        if reference is None:
            return
        acting = self.calls.prepare(reference, self.clamp.check_action)
        if acting is not None:
            self.latency.add(acting)

    @property
    def act_ahead(self) -> bool:
        """Whether the loop acts when a tick's reference arrives (:class:`PolicyCalls`)."""
        return self.calls.act_ahead

    def _count_transition(self) -> None:
        self.stats.transitions += 1

    def _count_policy_error(self, what: str) -> None:
        with self._lock:
            self.stats.policy_errors += 1
            self.stats.last_policy_error = what

    # ----------------------------------------------------------------- control

    def _stale_reason(self, now_s: float) -> tuple[str, str]:
        """``(reason, detail)`` of the safe action the inputs call for now; ``("", "")`` if
        none. Inputs that keep arriving but are rejected for their stamps are named as such."""
        reason, detail = self.inputs.stale_reason(now_s)
        if reason:
            return reason, detail
        behind = self.timing.reference_behind(now_s, self.config.watchdog_timeout_s)
        if behind:
            return "reference_behind", behind
        return "", ""

    def _safe_result(self, reason: str, error: str = "", compute_s: float = 0.0,
                     detail: str = "", now_s: float | None = None) -> TickResult:
        self.calls.interrupt()  # the last policy tick's transition still counts
        if not self._safe_reason:
            self.safe.latch(None if self.inputs.sample is None else self.inputs.sample.position)
            if reason in STALE_REASONS:
                self.stats.stale_events += 1
        self._safe_reason = reason
        self._safe_detail = detail or error
        efforts = self.safe.efforts(self.inputs.sample)
        action = np.zeros(self.n)  # no policy action: the next observation says so
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
        stamp, previous = self.timing.start_tick(now_s)
        with self._lock:
            self.stats.ticks += 1
            # a gap explained by stale inputs is reported as such, not as a late tick
            late_gap = (previous is not None and self._safe_reason not in STALE_REASONS
                        and stamp - previous > 1.5 * self.period_s)
        self._watchdog_next = None
        reason, detail = self._stale_reason(now_s)
        if self.inputs.sample is None or self.inputs.reference is None:
            reason = reason or "no_data"
        if reason:
            result = self._safe_result(reason, detail=detail, now_s=now_s)
            self._count_late(late_gap, 0.0)
            return result
        assert self.inputs.sample is not None and self.inputs.reference is not None
        sample = self.inputs.sample
        reference = self._reference_for(stamp)
        assert reference is not None
        self._tick_reference = reference
        start = time.perf_counter()
        try:
            applied, terms, acting = self.calls.act(sample, reference, self.clamp.check_action)
            efforts = self.clamp.clamp(effort_command(self.law, applied, sample.position,
                                                      sample.velocity, reference, terms))
        except Exception as exc:  # noqa: BLE001 - the loop must survive any policy failure
            compute = time.perf_counter() - start
            self._count_policy_error(f"{type(exc).__name__}: {exc}")
            self.calls.failed()
            result = self._safe_result("policy_error", self.stats.last_policy_error, compute,
                                       now_s=now_s)
            self._count_late(late_gap, compute)
            return result
        compute = time.perf_counter() - start
        if acting is not None:
            self.latency.add(acting)
        if self._safe_reason:
            self.safe.release()
            self._safe_reason = ""
            self._safe_detail = ""
        self._commanded(now_s)
        self.stats.policy_ticks += 1
        self._count_late(late_gap, compute)
        return TickResult(efforts, applied, False, "", compute)

    def _count_late(self, late_gap: bool, compute_s: float) -> None:
        self._tick_late = late_gap or compute_s > self.config.late_tick_fraction * self.period_s
        if self._tick_late:
            with self._lock:
                self.stats.late_ticks += 1

    def after_command(self) -> None:
        """Call once a tick's command is out: the work that need not delay it -- with
        :attr:`act_ahead` the transition that ended at the tick (otherwise done before the
        next action); the next tick's preparation if its reference came before this tick's
        joint state was served (a preview one control period ahead); then the policy's
        ``after_command()`` (if it has one). A failure is counted, never raised."""
        self.calls.finish()
        newest = self.inputs.newest_reference_stamp
        if newest is not None and self.timing.next_due is not None:
            # the next tick's reference already here (a preview): prepare it again, after
            # this tick's transition (if it was prepared before, it acted without it)
            instant = self.timing.reference_known_for(newest, again=True)
            if instant is not None:
                self._prepare(instant)
        hook = getattr(self.policy, "after_command", None)
        if not callable(hook):
            return
        try:
            with self.calls.lock:
                hook()
        except Exception as exc:  # noqa: BLE001 - the loop must survive any policy failure
            self._count_policy_error(f"after_command: {type(exc).__name__}: {exc}")

    def record_publish_latency(self, seconds: float) -> None:
        """Record a tick's receipt-to-publish time (``/diagnostics``
        ``command_latency_*``) and count the tick as late if it took longer than its budget.

        For callers that measure more than the policy's compute time (message conversion,
        publishing); call once per tick, after :meth:`tick`. A tick is counted once.
        """
        self.command_latency.add(seconds)
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
        if not self.inputs.ever_arrived():
            return None  # nothing ever arrived: not started yet, do not spam commands
        if self._watchdog_next is not None and now_s < self._watchdog_next:
            return None
        self._watchdog_next = now_s + 0.5 * self.period_s
        if reason == "reference_behind":
            self.timing.give_up()  # answered safely
        with self._lock:
            self.stats.ticks += 1
        return self._safe_result(reason, detail=detail, now_s=now_s)

    @property
    def last_tick_stamp(self) -> float | None:
        """Stamp (s) of the instant the latest tick answered (also a repeated answer's)."""
        return self.timing.last_tick_stamp

    def impedance(self, result: TickResult) -> ImpedanceCommand | None:
        """``result``'s efforts as joint impedance setpoints and feed-forward
        (:func:`~metarl_ros.control.impedance.impedance_command`) on the reading and reference
        they were computed from; None before the first joint state."""
        sample = self.inputs.sample
        if sample is None:
            return None
        reference = (self._tick_reference if self._tick_reference is not None
                     else self.inputs.reference)  # the tick's, not a preview's
        return impedance_command(self.law, result.efforts, sample.position, sample.velocity,
                                 reference, result.safe)

    @property
    def latest_position(self) -> np.ndarray | None:
        """Positions (contract order) of the latest accepted joint state; None before one."""
        return None if self.inputs.sample is None else self.inputs.sample.position

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
            with self.calls.lock:
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
        latent = self._latent_tracker.update(mean, std, posterior.window_fill,
                                             self.config.adaptation_event_threshold)
        if latent.adaptation_event:
            with self._lock:
                self.stats.adaptation_events += 1
                self.stats.last_adaptation_s = now_s
        self._latent = latent
        return latent

    def close(self) -> None:
        """Stop the policy's background work (calls ``policy.close()`` if it has one)."""
        close = getattr(self.policy, "close", None)
        if callable(close):
            with self.calls.lock:
                close()

    # ----------------------------------------------------------------- diagnostics

    def diagnostics(self, now_s: float) -> DiagnosticsReport:
        """Values for ``/diagnostics`` (all as strings, as DiagnosticStatus wants them)."""
        with self._lock:
            stats = self.stats.copy()
        return loop_report(stats, self.latency, self._latent, self.config, self._safe_reason,
                           self._safe_detail, self._idle(now_s),
                           self.inputs.joint_watchdog.age(now_s),
                           self.inputs.reference_watchdog.age(now_s), self.policy_status(),
                           self.command_latency)

    def policy_status(self) -> PolicyStatus | None:
        """The policy's own status (its background work), if it offers ``status()``; a
        failing ``status()`` is reported as a warning, never raised."""
        status = getattr(self.policy, "status", None)
        if not callable(status):
            return None
        try:
            return status()
        except Exception as exc:  # noqa: BLE001 - diagnostics must not fail
            return PolicyStatus("warn", f"policy status failed: {type(exc).__name__}: {exc}")

    def _idle(self, now_s: float) -> str:
        """Why nothing has been commanded for ``idle_after_s`` wall seconds, or ''."""
        since = self._last_command_wall
        wall_s = self._wall() - (self._start_wall if since is None else since)
        return idle_reason(wall_s, self.config.idle_after_s, since is not None, now_s,
                           self._last_command_now)
