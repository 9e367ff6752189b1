"""The control loop's settings (:class:`LoopConfig`) and what a tick returns
(:class:`TickResult`), shared by :mod:`~metarl_ros.control.controller`, its diagnostics and the
nodes that run it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: safe-command reasons meaning "no usable input": a gap they explain is not a late tick.
STALE_REASONS: tuple[str, ...] = ("sensor_stale", "reference_stale", "stamp_offset",
                                  "reference_behind")


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
class LoopConfig:
    """Settings of :class:`~metarl_ros.control.controller.AdaptiveController` (the adapter
    node's parameters)."""

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
    act_ahead: bool = False
    """for a policy that acts on the reference view of its observation only
    (``acts_on_reference``): compute the action when the reference of a tick arrives, on the
    posterior of the transitions up to the previous tick, and observe the newest transition
    once the command is out -- the latent the action uses is one tick older, and the joint
    state's path is the PD feedback alone (:mod:`~metarl_ros.control.prepared`). Other
    policies act at the joint state whatever this says."""
