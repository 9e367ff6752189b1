"""The on-robot controller contract, shared by the torch and ONNX nodes.

A ROS node never touches networks directly: it turns joint states and the reference into an
observation (:func:`metarl_ros.sim.env.build_observation`), feeds transitions to an
:class:`AdaptivePolicy`, asks it for an action and publishes ``action * action_scale`` as
efforts. Implementations: the torch PEARL(+MAML) runtime (``metarl_ros.learning.runtime``) and
the ONNX runtime (``metarl_ros.deploy``), plus :class:`PDPolicy`, a classical baseline that
needs no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class PolicyContract:
    """What a policy expects of the robot; travels with exported models."""

    joint_names: tuple[str, ...]
    control_rate_hz: float
    window_size: int
    latent_dim: int
    obs_dim: int
    act_dim: int
    action_scale: tuple[float, ...]
    effort_limits: tuple[float, ...]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, contract: dict) -> "PolicyContract":
        """From a model's stored contract (model.pt or ONNX metadata); unknown keys go to
        ``extra``."""
        c = contract
        return cls(
            joint_names=tuple(c["joint_names"]),
            control_rate_hz=float(c["control_rate_hz"]),
            window_size=int(c["window_size"]),
            latent_dim=int(c["latent_dim"]),
            obs_dim=int(c["obs_dim"]),
            act_dim=int(c["act_dim"]),
            action_scale=tuple(c["action_scale"]),
            effort_limits=tuple(c["effort_limits"]),
            extra={k: v for k, v in c.items() if k not in cls.__dataclass_fields__},
        )


@dataclass(frozen=True)
class PosteriorSummary:
    """Posterior over the task latent: mean and std, each shape (latent_dim,)."""

    mean: np.ndarray
    std: np.ndarray
    window_fill: int


@runtime_checkable
class AdaptivePolicy(Protocol):
    """A controller that adapts online from recent transitions.

    Called from the control loop: ``act`` must be fast and never block on adaptation work.
    """

    contract: PolicyContract

    def reset(self) -> None:
        """Forget the context (e.g. at the start of an episode)."""

    def observe(
        self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray
    ) -> None:
        """Add one transition to the window.

        obs, next_obs: (obs_dim,); action: (act_dim,); reward: float.
        """

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Normalized action in [-1, 1], shape (act_dim,), for observation (obs_dim,)."""

    def posterior(self) -> PosteriorSummary:
        """The current belief about the task."""


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


class FrozenContext:
    """Adaptation off: wraps a policy so that it never sees a transition.

    A PEARL policy's latent then stays at the prior N(0, I) (no context inference, no MAML
    data): the task-agnostic controller the trained policy is before any adaptation. Other
    attributes (``inference_time_s``, ``adaptation``...) are the wrapped policy's.
    """

    def __init__(self, policy: AdaptivePolicy) -> None:
        self.policy = policy
        self.contract = policy.contract

    def __getattr__(self, name: str):
        if name == "policy":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.policy, name)

    def reset(self) -> None:
        self.policy.reset()

    def observe(self, obs, action, reward, next_obs) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.policy.act(obs)

    def posterior(self) -> PosteriorSummary:
        return self.policy.posterior()
