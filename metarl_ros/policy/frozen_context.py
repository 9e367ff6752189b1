"""Adaptation off: a wrapper that hides every transition from the policy it wraps."""

from __future__ import annotations

import numpy as np

from metarl_ros.control.policy_interface import AdaptivePolicy, PosteriorSummary


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
