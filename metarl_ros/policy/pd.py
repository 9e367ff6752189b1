"""Joint-space PD from the observation: the model-free reference controller."""

from __future__ import annotations

import numpy as np

from metarl_ros.control.policy_interface import PolicyContract, PosteriorSummary


class PDPolicy:
    """Joint-space PD on the observation's error blocks; a model-free reference controller.

    It reads the position/velocity error blocks of the observation (layout in
    :mod:`metarl_ros.sim.env`), so it needs the scales used to build it.
    """

    def __init__(
        self,
        contract: PolicyContract,
        kp: np.ndarray,
        kd: np.ndarray,
        position_error_scale: float,
        velocity_error_scale: float,
    ) -> None:
        n = contract.act_dim
        self.contract = contract
        self._kp = np.asarray(kp, dtype=np.float64)
        self._kd = np.asarray(kd, dtype=np.float64)
        self._scale = np.asarray(contract.action_scale, dtype=np.float64)
        self._pos = slice(2 * n, 3 * n)
        self._vel = slice(3 * n, 4 * n)
        self._pos_scale = position_error_scale
        self._vel_scale = velocity_error_scale

    def reset(self) -> None:
        pass

    def observe(self, obs, action, reward, next_obs) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        error = obs[self._pos] / self._pos_scale
        error_rate = obs[self._vel] / self._vel_scale
        torque = self._kp * error + self._kd * error_rate
        return np.clip(torque / self._scale, -1.0, 1.0).astype(np.float32)

    def posterior(self) -> PosteriorSummary:
        return PosteriorSummary(np.zeros(0), np.zeros(0), 0)
