"""Adaptation off: a wrapper that hides every transition from the policy it wraps."""

from __future__ import annotations

from metarl_ros.policy.wrapper import PolicyWrapper


class FrozenContext(PolicyWrapper):
    """Adaptation off: wraps a policy so that it never sees a transition.

    A PEARL policy's latent then stays at the prior N(0, I) (no context inference, no MAML
    data): the task-agnostic controller the trained policy is before any adaptation. Other
    attributes (``inference_time_s``, ``adaptation``...) are the wrapped policy's.
    """

    def observe(self, obs, action, reward, next_obs) -> None:
        pass
