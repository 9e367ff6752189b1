"""The control loop's counters, latency percentiles and its /diagnostics report."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


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
    stamp_jumps: int = 0
    """times the tick grid was reset because stamps went back or stopped fitting it."""
    last_policy_error: str = ""
    last_rejection: str = ""
    last_adaptation_s: float = float("nan")
    last_stamp_jump: str = ""
    rejections_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DiagnosticsReport:
    level: Literal["ok", "warn", "error"]
    message: str
    values: dict[str, str]
