"""One controller driving the env, step by step: the loop every evaluation shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.sim.env import ArmTrackingEnv


class Step(NamedTuple):
    """One control step: ``obs`` (obs_dim,) before it, the ``action`` (act_dim,) applied,
    ``next_obs`` after it, the env's ``reward`` and ``info``."""

    obs: np.ndarray
    action: np.ndarray
    next_obs: np.ndarray
    reward: float
    info: dict[str, Any]


def policy_steps(env: ArmTrackingEnv, policy: AdaptivePolicy | None, obs: np.ndarray,
                 steps: int) -> Iterator[Step]:
    """Run ``steps`` control steps from ``obs`` (the env just reset, the policy too): the
    policy acts, the env steps, the policy observes the transition, the step is yielded.
    ``policy=None`` is the env's own effort alone (zero action). Whatever the caller does
    between two steps (e.g. tell a privileged policy the new task) comes before the next act.
    """
    zero = np.zeros(env.action_space.shape, np.float32)
    for _ in range(steps):
        action = zero if policy is None else np.asarray(policy.act(obs), dtype=np.float32)
        next_obs, reward, _, _, info = env.step(action)
        if policy is not None:
            policy.observe(obs, action, float(reward), next_obs)
        yield Step(obs, action, next_obs, float(reward), info)
        obs = next_obs
