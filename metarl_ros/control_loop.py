"""The adapter's control loop without ROS: what the ROS nodes run, message types aside.

The ROS nodes (:mod:`metarl_ros.nodes.adapter_node`, and the ONNX deploy node) only translate
messages to and from the plain values used here, so everything that decides *what* to command
is testable without DDS:

* :class:`JointNameMapper` -- joints matched **by name**, in any order, extra joints ignored;
  wrong lengths, missing joints and non-finite values are rejected (:class:`RejectedInput`).
* :class:`Watchdog` -- age of the latest accepted message.
* :class:`EffortClamp` -- checks the policy's action (shape, finite) and clips it to
  [-1, 1]; clamps efforts to the effort limits; never emits a non-finite value. The efforts
  themselves come from :func:`~metarl_ros.sim.env.effort_command` (the env's fixed PD feedback
  on the reference plus ``action * action_scale``), as in training.
* :class:`SafeAction` -- what is commanded when the policy cannot be trusted: ``zero`` effort
  (the robot's own gravity compensation keeps running) or ``hold``, a PD to the position
  latched when safe mode began.
* :class:`AdaptiveController` -- ties them together around an
  :class:`~metarl_ros.runtime.AdaptivePolicy`: builds the observation with
  :func:`~metarl_ros.sim.env.build_observation` and the (s, a, r, s') transitions with
  :func:`~metarl_ros.sim.env.tracking_reward` (never re-implemented here), decides when a
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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from metarl_ros.runtime import AdaptivePolicy
from metarl_ros.control_law import build_observation, effort_command, tracking_reward
from metarl_ros.sim.env_config import EnvSetup

SafeMode = Literal["zero", "hold"]
SAFE_MODES: tuple[str, ...] = ("zero", "hold")


class RejectedInput(ValueError):
    """An input message was not used. ``reason`` is a short machine-readable key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------------
# Joint mapping


@dataclass(frozen=True)
class JointSample:
    """One reading mapped to the contract's joint order; each array shape (n,)."""

    position: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray | None = None


class JointNameMapper:
    """Map ``sensor_msgs/JointState``-like data onto a fixed joint order, by name.

    Args:
        joint_names: the order the policy expects (the contract's ``joint_names``).
        allow_unnamed: accept a message without names if its arrays have exactly ``n``
            entries, taken in contract order (used for the simulator's ``/reference``).
    """

    def __init__(self, joint_names: Sequence[str], allow_unnamed: bool = False) -> None:
        if len(set(joint_names)) != len(joint_names) or not joint_names:
            raise ValueError(f"joint_names must be non-empty and unique, got {joint_names}")
        self.joint_names = tuple(joint_names)
        self.allow_unnamed = allow_unnamed
        self._cache_key: tuple[str, ...] | None = None
        self._cache_index: np.ndarray | None = None

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def _index(self, names: Sequence[str]) -> np.ndarray:
        key = tuple(names)
        if key == self._cache_key and self._cache_index is not None:
            return self._cache_index
        if len(set(key)) != len(key):
            raise RejectedInput("duplicate_names", f"joint names repeat: {list(key)}")
        where = {name: i for i, name in enumerate(key)}
        missing = [name for name in self.joint_names if name not in where]
        if missing:
            raise RejectedInput("missing_joints", f"message lacks joints {missing}")
        index = np.array([where[name] for name in self.joint_names], dtype=np.int64)
        self._cache_key, self._cache_index = key, index
        return index

    def map(
        self,
        names: Sequence[str],
        position: Sequence[float],
        velocity: Sequence[float],
        effort: Sequence[float] | None = None,
        require_effort: bool = False,
    ) -> JointSample:
        """Return the contract joints' values; raise :class:`RejectedInput` if unusable.

        ``position`` and ``velocity`` must have one entry per name; ``effort`` may be empty
        (it is then ``None`` in the result) unless ``require_effort``. Only the contract's
        joints are checked for finiteness: a NaN on an ignored extra joint does not matter.
        """
        n_names = len(names)
        if n_names == 0:
            if not self.allow_unnamed:
                raise RejectedInput("no_names", "message has no joint names")
            n_names = self.num_joints
            index = np.arange(self.num_joints)
        else:
            index = self._index(names)
        if len(position) != n_names:
            raise RejectedInput(
                "length_mismatch", f"{n_names} names but {len(position)} positions"
            )
        if len(velocity) != n_names:
            raise RejectedInput(
                "length_mismatch", f"{n_names} names but {len(velocity)} velocities"
            )
        has_effort = effort is not None and len(effort) > 0
        if has_effort and len(effort) != n_names:
            raise RejectedInput("length_mismatch", f"{n_names} names but {len(effort)} efforts")
        if require_effort and not has_effort:
            raise RejectedInput("length_mismatch", "message has no effort entries")
        pos = np.asarray(position, dtype=np.float64)[index]
        vel = np.asarray(velocity, dtype=np.float64)[index]
        eff = np.asarray(effort, dtype=np.float64)[index] if has_effort else None
        finite = np.isfinite(pos).all() and np.isfinite(vel).all()
        if eff is not None:
            finite = finite and bool(np.isfinite(eff).all())
        if not finite:
            raise RejectedInput("non_finite", "non-finite value on a controlled joint")
        return JointSample(pos, vel, eff)


# ------------------------------------------------------------------------------------------
# Watchdog, clamp, safe action, log throttle


class Watchdog:
    """Tracks the age of the latest accepted input. Stale when older than ``timeout_s``.

    An input that never arrived has no age (``inf``) until the watchdog is :meth:`arm`-ed;
    from then on it counts from the arming time, so "never arrived" becomes stale only after
    the timeout, like "stopped arriving".
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.last_s: float | None = None
        self.armed_s: float | None = None

    def feed(self, now_s: float) -> None:
        self.last_s = float(now_s)

    def arm(self, now_s: float) -> None:
        """Start expecting input now (no effect once armed or fed)."""
        if self.armed_s is None and self.last_s is None:
            self.armed_s = float(now_s)

    def age(self, now_s: float) -> float:
        """Seconds since the last input (or since arming, if none arrived); else ``inf``."""
        since = self.last_s if self.last_s is not None else self.armed_s
        if since is None:
            return math.inf
        return max(0.0, float(now_s) - since)

    def stale(self, now_s: float) -> bool:
        return self.age(now_s) > self.timeout_s


class EffortClamp:
    """Normalized action -> joint efforts (N*m), always finite and inside the limits."""

    def __init__(self, action_scale: Sequence[float], effort_limits: Sequence[float]) -> None:
        self.scale = np.asarray(action_scale, dtype=np.float64)
        self.limits = np.asarray(effort_limits, dtype=np.float64)
        if self.scale.shape != self.limits.shape:
            raise ValueError("action_scale and effort_limits must have the same length")
        if (self.limits <= 0).any() or (self.scale <= 0).any():
            raise ValueError("action_scale and effort_limits must be > 0")

    def check_action(self, action: np.ndarray) -> np.ndarray:
        """Return the action clipped to [-1, 1] (float64, shape (n,)).

        Raises ``ValueError`` on a wrong shape or a non-finite entry (the caller treats that
        as a policy failure).
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != self.scale.shape:
            raise ValueError(f"action has shape {action.shape}, expected {self.scale.shape}")
        if not np.isfinite(action).all():
            raise ValueError("action contains non-finite values")
        return np.clip(action, -1.0, 1.0)

    def clamp(self, efforts: np.ndarray) -> np.ndarray:
        """Clamp efforts to the limits; a non-finite entry becomes 0."""
        efforts = np.asarray(efforts, dtype=np.float64)
        efforts = np.where(np.isfinite(efforts), efforts, 0.0)
        return np.clip(efforts, -self.limits, self.limits)



class SafeAction:
    """The command used when the policy cannot be trusted (stale inputs, policy failure).

    ``zero``: zero effort (the robot's firmware keeps compensating gravity).
    ``hold``: ``kp * (q_hold - q) - kd * qd`` towards the position latched when safe mode
    began, from the latest reading. With stale sensors that reading is frozen too, so the
    command is the last one computed, not a feedback law.
    """

    def __init__(self, mode: str, kp: Sequence[float], kd: Sequence[float],
                 clamp: EffortClamp) -> None:
        if mode not in SAFE_MODES:
            raise ValueError(f"safe_mode must be one of {SAFE_MODES}, got {mode!r}")
        self.mode = mode
        self.kp = np.asarray(kp, dtype=np.float64)
        self.kd = np.asarray(kd, dtype=np.float64)
        n = clamp.scale.shape[0]
        if mode == "hold" and (self.kp.shape != (n,) or self.kd.shape != (n,)):
            raise ValueError(f"hold_kp and hold_kd need {n} entries")
        self._clamp = clamp
        self._n = n
        self.hold_position: np.ndarray | None = None

    def latch(self, position: np.ndarray | None) -> None:
        """Remember where to hold (call when safe mode begins)."""
        self.hold_position = None if position is None else np.asarray(position, float).copy()

    def release(self) -> None:
        self.hold_position = None

    def efforts(self, sample: JointSample | None) -> np.ndarray:
        if self.mode == "zero" or sample is None:
            return np.zeros(self._n)
        if self.hold_position is None:
            self.latch(sample.position)
        assert self.hold_position is not None
        raw = self.kp * (self.hold_position - sample.position) - self.kd * sample.velocity
        return self._clamp.clamp(raw)


class LogThrottle:
    """Allow one message per ``key`` every ``period_s`` (wall clock by default).

    :meth:`ready` returns ``None`` when the message should be dropped, else the number of
    messages for that key that were dropped since the last one let through.
    """

    def __init__(self, period_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = float(period_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def ready(self, key: str) -> int | None:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._dropped.pop(key, 0)


# ------------------------------------------------------------------------------------------
# Diagnostics values


class LatencyWindow:
    """Sliding window of durations (s) with percentiles in milliseconds."""

    def __init__(self, size: int = 1000) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(float(seconds))

    def __len__(self) -> int:
        return len(self._values)

    def percentile_ms(self, q: float) -> float:
        if not self._values:
            return float("nan")
        return float(np.percentile(np.fromiter(self._values, float), q) * 1e3)

    def max_ms(self) -> float:
        return max(self._values) * 1e3 if self._values else float("nan")


@dataclass
class LoopStats:
    """Counters shown on ``/diagnostics``. All counts are since start."""

    ticks: int = 0
    """control ticks (policy or safe)."""
    policy_ticks: int = 0
    safe_ticks: int = 0
    """ticks (and watchdog periods) that commanded the safe action."""
    late_ticks: int = 0
    """ticks computed over budget, or more than 1.5 control periods after the previous one."""
    transitions: int = 0
    """transitions handed to ``policy.observe``."""
    policy_errors: int = 0
    """exceptions in act/observe, and actions of wrong shape or non-finite."""
    context_errors: int = 0
    rejected_joint_states: int = 0
    rejected_references: int = 0
    stale_events: int = 0
    """times the loop entered safe mode because inputs went stale."""
    adaptation_events: int = 0
    last_policy_error: str = ""
    last_rejection: str = ""
    last_adaptation_s: float = float("nan")
    rejections_by_reason: dict[str, int] = field(default_factory=dict)


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


@dataclass(frozen=True)
class DiagnosticsReport:
    level: Literal["ok", "warn", "error"]
    message: str
    values: dict[str, str]


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
    """The control loop around an :class:`~metarl_ros.runtime.AdaptivePolicy`.

    Thread-safety: the control-path methods (``on_joint_state``, ``on_reference``, ``tick``,
    ``watchdog``) must be called from one thread at a time; ``update_context`` and
    ``diagnostics`` may run on another thread. The protocol does not promise a thread-safe
    policy, so policy calls are serialized by a lock: ``observe``/``act`` (control) never run
    at the same time as ``update_context()``/``posterior()`` (context). Those two must
    therefore be cheap; heavy adaptation belongs in the policy's own background thread.

    Args:
        setup: the env setup whose observation and reward the policy was trained with.
        policy: the controller.
        config: loop settings.
        joint_names: joint order of the policy (default: the setup's robot).
    """

    def __init__(self, setup: EnvSetup, policy: AdaptivePolicy, config: LoopConfig,
                 joint_names: Sequence[str] | None = None) -> None:
        robot = setup.robot
        self.setup = setup
        self.policy = policy
        self.config = config
        names = tuple(joint_names) if joint_names is not None else tuple(robot.joint_names)
        self.n = len(names)
        if self.n != setup.act_dim:
            raise ValueError(f"{self.n} joint names, but the setup has {setup.act_dim} joints")
        if not config.control_rate_hz > 0:
            raise ValueError("control_rate_hz must be > 0")
        self.period_s = 1.0 / config.control_rate_hz
        self.joints = JointNameMapper(names)
        self.references = JointNameMapper(names, allow_unnamed=True)
        if not 0.0 < config.effort_limit_scale <= 1.0:
            raise ValueError("effort_limit_scale must be in (0, 1], got "
                             f"{config.effort_limit_scale}")
        self.clamp = EffortClamp(robot.action_scale,
                                 np.asarray(robot.effort_limits) * config.effort_limit_scale)
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
                obs = build_observation(self.setup, sample.position, sample.velocity,
                                        reference, self._last_action.astype(np.float32))
                if self._previous is not None:
                    prev_obs, prev_action = self._previous
                    error = float(np.linalg.norm(reference[0] - sample.position))
                    reward = tracking_reward(self.setup, error, prev_action)
                    self.policy.observe(prev_obs, prev_action.astype(np.float32), reward, obs)
                    self.stats.transitions += 1
                applied = self.clamp.check_action(self.policy.act(obs))
            efforts = self.clamp.clamp(effort_command(self.setup, applied, sample.position,
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
