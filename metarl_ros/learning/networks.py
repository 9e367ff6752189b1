"""Network building blocks: MLPs, a tanh-Gaussian actor and a vectorized twin critic.

Sized for CPUs: the twin Q functions are one :class:`EnsembleMLP` (batched matmuls over the
ensemble dimension) instead of two separate networks, which halves kernel launches per update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """ReLU MLP ``in_dim -> hidden... -> out_dim`` with a linear output."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """``num_members`` independent linear layers applied with one batched matmul.

    Input (E, B, in) or (B, in) (broadcast to every member); output (E, B, out).
    """

    def __init__(self, num_members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.weight.shape[0], -1, -1)
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """An ensemble of ReLU MLPs. Input (B, in) -> output (E, B, out)."""

    def __init__(self, num_members: int, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(
            EnsembleLinear(num_members, a, b) for a, b in zip(dims[:-1], dims[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TwinCritic(nn.Module):
    """Two Q functions ``Q_i(obs, cond, action)``. Returns (2, B) values."""

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.net = EnsembleMLP(2, in_dim, hidden, 1)

    def forward(self, obs_cond: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """obs_cond (B, obs+cond), action (B, act) -> Q values (2, B)."""
        return self.net(torch.cat([obs_cond, action], dim=-1)).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """SAC policy: a Gaussian squashed by tanh into [-1, 1]^act_dim.

    ``obs_view`` (obs_dim, obs_dim), optional: a fixed linear map applied to the observation
    part of the input (its first ``obs_dim`` entries) before the network sees it, e.g.
    :func:`metarl_ros.control.law.reference_view_matrix` for a pure feed-forward actor. It is
    a buffer: saved, loaded and exported with the weights, never trained.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], act_dim: int,
                 obs_view: torch.Tensor | None = None) -> None:
        super().__init__()
        if obs_view is not None:
            if obs_view.dim() != 2 or obs_view.shape[0] != obs_view.shape[1] \
                    or obs_view.shape[0] > in_dim:
                raise ValueError(f"obs_view must be square (obs_dim, obs_dim) with obs_dim <= "
                                 f"{in_dim}, got {tuple(obs_view.shape)}")
            self.register_buffer("obs_view", obs_view.detach().clone().float())
        else:
            self.obs_view = None
        self.trunk = mlp(in_dim, hidden[:-1], hidden[-1]) if len(hidden) > 1 else None
        last = hidden[-1] if hidden else in_dim
        if self.trunk is None:
            self.trunk = nn.Linear(in_dim, last)
        self.head = nn.Linear(last, 2 * act_dim)
        self.act_dim = act_dim

    def viewed(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input: ``x`` (B, in) with ``obs_view`` applied to its observation."""
        if self.obs_view is None:
            return x
        n = self.obs_view.shape[0]
        return torch.cat([x[..., :n] @ self.obs_view.T, x[..., n:]], dim=-1)

    def distribution_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in) -> mean (B, act), log_std (B, act)."""
        h = F.relu(self.trunk(self.viewed(x)))
        mean, log_std = self.head(h).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic action ``tanh(mean)``, shape (B, act). This is what gets exported."""
        mean, _ = self.distribution_params(x)
        return torch.tanh(mean)

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized sample: action (B, act) and its log-probability (B,)."""
        mean, log_std = self.distribution_params(x)
        std = log_std.exp()
        pre_tanh = mean + std * torch.randn_like(mean)
        action = torch.tanh(pre_tanh)
        log_prob = (
            -0.5 * ((pre_tanh - mean) / std).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        ).sum(-1)
        # log|d tanh(u)/du| = 2 * (log 2 - u - softplus(-2u)), numerically stable
        log_prob = log_prob - (2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(
            -1
        )
        return action, log_prob
