"""An actor that infers a fault's physical parameters and feeds them forward through the model.

A feed-forward actor (``actor_view: reference``) that learns the feed-forward a fault needs
from scratch must learn the arm's dynamics too: an MLP of the reference state, which fits it to
a few N*m at best (the plain actor on a 2 kg payload, told the task: 24 mrad where the true
labels give 0.45; docs/LEARNING.md). :class:`ModelFeedForwardActor` keeps the rigid-body model
out of the learning: the observation carries the nominal model's torques along the reference
(:mod:`metarl_ros.control.model_features`), and the actor's condition -- PEARL's latent ``z``,
the oracle's task vector, nothing for nominal and robust -- is mapped to the physical
parameters ``theta`` of the fault, shape (3n + 10,)::

    theta = [u = 1/s - 1 (n), payload pi (10), damping d (n), Coulomb c (n)]

(:func:`metarl_ros.sim.true_dynamics.fault_parameters` gives a task's true ``theta``). With
the feature blocks ``F`` (each (n,), in action units) the deterministic action is::

    y = u * F_tau + (1 + u) * (sum_k pi_k F_Yk + d * F_qd + c * F_tanh) + r(obs, cond)
    action = clamp(y, -LIMIT, LIMIT)

the exact feed-forward of the true model for the true ``theta`` (a test checks it against the
teacher's labels), plus an MLP residual ``r`` for what the structure leaves out (actuator
delay, locked joints). ``theta`` depends on the condition only, not on the state: it is an
estimate of the robot, not a second controller. SAC's Gaussian is placed on
``atanh(action)``, so the squashing keeps the structure's action exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from metarl_ros.control.model_features import (
    NUM_BLOCKS,
    NUM_PAYLOAD_PARAMETERS,
    num_fault_parameters,
    parameter_scale,
)
from metarl_ros.learning.networks import LOG_STD_MAX, LOG_STD_MIN, TanhGaussianActor, mlp

LIMIT = 0.999
"""The structured action is clamped to +-LIMIT before ``atanh`` (labels are clipped at 1)."""


class ModelFeedForwardActor(TanhGaussianActor):
    """The structured actor (module doc). Input ``x`` (B, obs_dim + cond_dim), as the plain
    actor's; the observation's last ``NUM_BLOCKS * act_dim`` entries must be the model
    features (env ``observation.model_features: true``).

    Args:
        in_dim: obs_dim + cond_dim.
        hidden: the residual MLP's hidden widths.
        act_dim: n, the number of joints.
        obs_view: as :class:`TanhGaussianActor`'s (the features pass the reference view).
        obs_dim: observation entries (the condition follows them in ``x``).
        parameter_hidden: hidden widths of the condition -> ``theta`` network.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], act_dim: int,
                 obs_view: torch.Tensor | None, obs_dim: int,
                 parameter_hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__(in_dim, hidden, act_dim, obs_view)
        n = act_dim
        self.obs_dim = obs_dim
        self.feature_start = obs_dim - NUM_BLOCKS * n
        if self.feature_start < 0:
            raise ValueError(f"agent.actor_head 'model' needs the observation's model features "
                             f"({NUM_BLOCKS * n} entries; obs_dim is {obs_dim}): use an env with "
                             "observation.model_features: true, or agent.actor_head: mlp")
        with torch.no_grad():  # the residual starts at zero: the structure alone acts
            self.head.weight[:n].zero_()
            self.head.bias[:n].zero_()
        cond_dim = in_dim - obs_dim
        size = num_fault_parameters(n)
        # the parameter network's output is multiplied by it: it works with O(1) numbers
        self.register_buffer("parameter_scale",
                             torch.as_tensor(parameter_scale(n), dtype=torch.float32))
        if cond_dim > 0:
            self.parameter_net: nn.Module | None = mlp(cond_dim, parameter_hidden, size)
            last = self.parameter_net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.parameter_bias = None
        else:  # nothing to condition on: one estimate for every task
            self.parameter_net = None
            self.parameter_bias = nn.Parameter(torch.zeros(size))

    def physical_parameters(self, x: torch.Tensor) -> torch.Tensor:
        """``theta`` (B, 3n + 10) for inputs ``x`` (B, in) (layout: module doc)."""
        if self.parameter_net is None:
            assert self.parameter_bias is not None
            raw = self.parameter_bias.expand(*x.shape[:-1], -1)
        else:
            raw = self.parameter_net(x[..., self.obs_dim:])
        return raw * self.parameter_scale

    def structured_action(self, viewed: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``u F_tau + (1 + u)(pi . F_Y + d F_qd + c F_tanh)``, (B, n), from the viewed
        input (B, in) and ``theta`` (B, 3n + 10)."""
        n = self.act_dim
        features = viewed[..., self.feature_start:self.obs_dim].unflatten(-1, (NUM_BLOCKS, n))
        u, payload, damping, coulomb = theta.split([n, NUM_PAYLOAD_PARAMETERS, n, n], dim=-1)
        regressor = features[..., 1:1 + NUM_PAYLOAD_PARAMETERS, :]  # (B, 10, n)
        fault = ((payload.unsqueeze(-1) * regressor).sum(-2) + damping * features[..., -2, :]
                 + coulomb * features[..., -1, :])
        return u * features[..., 0, :] + (1.0 + u) * fault

    def _action_and_log_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        viewed = self.viewed(x)
        h = F.relu(self.trunk(viewed))
        residual, log_std = self.head(h).chunk(2, dim=-1)
        action = self.structured_action(viewed, self.physical_parameters(x)) + residual
        return action.clamp(-LIMIT, LIMIT), log_std

    def distribution_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in) -> mean (B, act), log_std (B, act); ``tanh(mean)`` is the clamped
        structured action plus the residual."""
        action, log_std = self._action_and_log_std(x)
        return torch.atanh(action), log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic action (B, act): the clamped structured action plus the residual,
        without the ``tanh(atanh(.))`` round trip (the exported graph; ONNX has no atanh)."""
        return self._action_and_log_std(x)[0]
