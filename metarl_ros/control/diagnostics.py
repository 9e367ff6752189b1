"""The control loop's counters, latency percentiles and its /diagnostics report."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from metarl_ros.control.joint_map import RejectedInput
from metarl_ros.control.latent import LatentUpdate
from metarl_ros.control.loop_types import LoopConfig
from metarl_ros.control.policy_interface import PolicyStatus


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

    def summary_ms(self) -> tuple[float, float, float]:
        """``(p50, p99, max)`` in ms from one pass over the window (the diagnostics timer's
        share of the control thread: a third of three separate calls)."""
        if not self._values:
            return float("nan"), float("nan"), float("nan")
        values = np.sort(np.fromiter(self._values, float, len(self._values)))
        return _sorted_percentile(values, 50) * 1e3, _sorted_percentile(values, 99) * 1e3, \
            float(values[-1]) * 1e3


def _sorted_percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) of sorted ``values``, without its
    Python overhead (a few hundred microseconds)."""
    position = q / 100.0 * (values.size - 1)
    low = int(position)
    high = min(low + 1, values.size - 1)
    return float(values[low] + (values[high] - values[low]) * (position - low))


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
    stamp_jumps: int = 0
    """times the tick grid was reset because stamps went back or stopped fitting it."""
    last_policy_error: str = ""
    last_rejection: str = ""
    last_adaptation_s: float = float("nan")
    last_stamp_jump: str = ""
    rejections_by_reason: dict[str, int] = field(default_factory=dict)

    def count_rejection(self, kind: str, error: RejectedInput) -> None:
        """An input of ``kind`` (``joint_state`` or ``reference``) was rejected."""
        if kind == "joint_state":
            self.rejected_joint_states += 1
        else:
            self.rejected_references += 1
        key = f"{kind}:{error.reason}"
        self.rejections_by_reason[key] = self.rejections_by_reason.get(key, 0) + 1
        self.last_rejection = f"{kind}: {error}"

    def copy(self) -> LoopStats:
        return LoopStats(**{**self.__dict__,
                            "rejections_by_reason": dict(self.rejections_by_reason)})


@dataclass(frozen=True)
class DiagnosticsReport:
    level: Literal["ok", "warn", "error"]
    message: str
    values: dict[str, str]
    policy: PolicyStatus | None = None
    """the policy's own status (``AdaptivePolicy.status()``), if it has one."""


def loop_report(s: LoopStats, latency: LatencyWindow, latent: LatentUpdate | None,
                config: LoopConfig, safe_reason: str, safe_detail: str, idle: str,
                joint_state_age_s: float, reference_age_s: float,
                policy: PolicyStatus | None = None,
                command_latency: LatencyWindow | None = None) -> DiagnosticsReport:
    """The control loop's ``/diagnostics`` status from a snapshot of its state: counters
    ``s``, ``latency`` (the policy's compute per action), ``command_latency`` (a tick's
    receipt-to-publish, as the node measures it), ``safe_reason`` ('' while the policy is in
    control), ``idle`` (why nothing has been commanded for a while, or '') and the policy's own
    ``status()`` (its values are added; its warning shows while nothing more serious does)."""
    late_pct = 100.0 * s.late_ticks / s.ticks if s.ticks else 0.0
    p50_ms, p99_ms, max_ms = latency.summary_ms()
    c50_ms, c99_ms, cmax_ms = (float("nan"),) * 3 if command_latency is None else \
        command_latency.summary_ms()
    state = safe_reason or ("idle" if idle else "policy")
    values: dict[str, Any] = {
        "state": state,
        "safe_detail": safe_detail if safe_reason else idle,
        "safe_mode": config.safe_mode,
        "control_rate_hz": config.control_rate_hz,
        "ticks": s.ticks,
        "policy_ticks": s.policy_ticks,
        "safe_ticks": s.safe_ticks,
        "late_ticks": s.late_ticks,
        "late_tick_pct": f"{late_pct:.2f}",
        "inference_latency_p50_ms": f"{p50_ms:.3f}",
        "inference_latency_p99_ms": f"{p99_ms:.3f}",
        "inference_latency_max_ms": f"{max_ms:.3f}",
        "command_latency_p50_ms": f"{c50_ms:.3f}",
        "command_latency_p99_ms": f"{c99_ms:.3f}",
        "command_latency_max_ms": f"{cmax_ms:.3f}",
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
        "joint_state_age_s": f"{joint_state_age_s:.3f}",
        "reference_age_s": f"{reference_age_s:.3f}",
        "rejected_joint_states": s.rejected_joint_states,
        "rejected_references": s.rejected_references,
        "last_rejection": s.last_rejection,
        "stamp_jumps": s.stamp_jumps,
        "last_stamp_jump": s.last_stamp_jump,
    }
    for key, count in sorted(s.rejections_by_reason.items()):
        values[f"rejected.{key}"] = count
    if policy is not None:
        values.update(policy.values)
    if safe_reason:
        level, message = "error", f"safe action ({config.safe_mode}): {safe_reason}"
        if safe_detail:
            message += f": {safe_detail}"
    elif idle:
        level, message = "warn", idle
    elif s.policy_errors or s.context_errors:
        level, message = "warn", f"policy errors: {s.policy_errors + s.context_errors}"
    elif s.ticks and late_pct > 5.0:
        level, message = "warn", f"{late_pct:.1f}% late ticks"
    else:
        level, message = "ok", "policy in control"
    if policy is not None and policy.level == "warn" and level != "error":
        level, message = "warn", f"{message}; {policy.message}"
    return DiagnosticsReport(level, message, {k: str(v) for k, v in values.items()}, policy)


def idle_reason(wall_s: float, idle_after_s: float, commanded: bool, now_s: float,
                last_command_now: float | None) -> str:
    """Why nothing has been commanded for ``wall_s`` wall seconds (since the last command if
    ``commanded``, else since start) if that is more than ``idle_after_s``, else ''.
    ``last_command_now``: the caller's clock at the last command (None: not known)."""
    if wall_s <= idle_after_s:
        return ""
    if not commanded:
        return f"no command yet after {wall_s:.1f} s: waiting for joint states and reference"
    if last_command_now is not None and now_s <= last_command_now:
        return (f"no command for {wall_s:.1f} s (wall): this node's clock stands at "
                f"{now_s:.3f} s (simulated time paused?)")
    return f"no command for {wall_s:.1f} s (wall)"
