"""A policy around a policy: the base of the wrappers that change one part of what it does."""

from __future__ import annotations

import numpy as np

from metarl_ros.control.policy_interface import AdaptivePolicy, PosteriorSummary


class PolicyWrapper:
    """Passes every :class:`~metarl_ros.control.policy_interface.AdaptivePolicy` call, and
    every other attribute (``inference_time_s``, ``status``, ``adaptation``...), to the wrapped
    ``policy``; subclasses override what they change."""

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
        self.policy.observe(obs, action, reward, next_obs)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.policy.act(obs)

    def posterior(self) -> PosteriorSummary:
        return self.policy.posterior()
