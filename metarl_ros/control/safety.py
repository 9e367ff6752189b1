"""What may reach the motors: action checks, effort limits and the safe command.

* :class:`EffortClamp` -- checks the policy's action (shape, finite) and clips it to [-1, 1];
  clamps efforts to the effort limits; never emits a non-finite value.
* :class:`SafeAction` -- what is commanded when the policy cannot be trusted: ``zero`` effort
  (the robot's own gravity compensation keeps running) or ``hold``, a PD to the position
  latched when safe mode began.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from metarl_ros.control.joint_map import JointSample

SafeMode = Literal["zero", "hold"]
SAFE_MODES: tuple[str, ...] = ("zero", "hold")


class EffortClamp:
    """Normalized action -> joint efforts (N*m), always finite and inside the limits."""

    def __init__(self, action_scale: Sequence[float], effort_limits: Sequence[float]) -> None:
        self.scale = np.asarray(action_scale, dtype=np.float64)
        self.limits = np.asarray(effort_limits, dtype=np.float64)
        if self.scale.shape != self.limits.shape:
            raise ValueError("action_scale and effort_limits must have the same length")
        if (self.limits <= 0).any() or (self.scale <= 0).any():
            raise ValueError("action_scale and effort_limits must be > 0")
        self._negative_limits = -self.limits

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
        return np.minimum(np.maximum(action, -1.0), 1.0)  # np.clip's wrapper costs as much

    def clamp(self, efforts: np.ndarray) -> np.ndarray:
        """Clamp efforts to the limits; a non-finite entry becomes 0."""
        efforts = np.asarray(efforts, dtype=np.float64)
        efforts = np.where(np.isfinite(efforts), efforts, 0.0)
        return np.minimum(np.maximum(efforts, self._negative_limits), self.limits)



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
