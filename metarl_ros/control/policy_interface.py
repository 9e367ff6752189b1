"""What the control loop drives: the policy Protocol and the contract a model carries.

The controller (:mod:`metarl_ros.control.controller`) turns joint states and the reference
into an observation (:func:`metarl_ros.control.law.build_observation`), feeds transitions to
an :class:`AdaptivePolicy`, asks it for an action and commands the law's efforts. The
implementations live in :mod:`metarl_ros.policy`; the Protocol lives here, beside the loop
that calls it, so that ``control`` depends on no implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, runtime_checkable

import numpy as np

from metarl_ros.control.measured import MeasuredObservation


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


@dataclass(frozen=True)
class PolicyStatus:
    """Health of a policy's own background work, for ``/diagnostics`` (optional: a policy
    that has such work offers it as ``status() -> PolicyStatus``; the control loop adds
    ``values`` to its report and, with ``level`` ``warn``, warns with ``message``).

    ``status()`` may be called from another thread than the control loop's; it must be cheap
    and must not raise.
    """

    level: Literal["ok", "warn"]
    message: str
    values: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class AdaptivePolicy(Protocol):
    """A controller that adapts online from recent transitions.

    Called from the control loop: ``act`` must be fast and never block on adaptation work.
    Optional hooks the loop calls when a policy has them: ``update_context()`` (at the
    context rate), ``after_command()`` (once a tick's command is published: bookkeeping that
    need not delay it), ``status()`` (:class:`PolicyStatus`) and ``close()``. What lets the
    loop act before the joint state arrives is read by :func:`ahead_parts`.
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


ActOnReference = Callable[[np.ndarray], np.ndarray]
"""An action (act_dim,) from an observation (obs_dim,) of which only the reference view is
read."""
CorrectMeasured = Callable[[MeasuredObservation, np.ndarray], np.ndarray]
"""``(measured, action) -> action``: a correction of an action (act_dim,) on the measured
observation."""


def ahead_parts(policy: AdaptivePolicy) -> tuple[ActOnReference, CorrectMeasured | None] | None:
    """How much of ``policy``'s action can be computed before the joint state arrives.

    * ``acts_on_reference`` True: ``act`` reads only the observation's reference view (the
      reference and the model features on it, the previous action), so all of it:
      ``(policy.act, None)``;
    * ``base_acts_on_reference`` True: the policy splits ``act(obs) ==
      correct(MeasuredObservation.given(obs, n), base_act(obs))`` into an action on the
      reference view and a correction on the measured observation (the MAML correction: it
      scales the commanded torque, PD feedback included),
      so ``(policy.base_act, policy.correct)``: the loop calls ``base_act`` when the
      reference arrives and ``correct`` at the joint state;
    * otherwise None: the action waits for the joint state.
    """
    if getattr(policy, "acts_on_reference", False):
        return policy.act, None
    if getattr(policy, "base_acts_on_reference", False):
        return policy.base_act, policy.correct  # type: ignore[attr-defined]
    return None
