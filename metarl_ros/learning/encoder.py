"""PEARL's probabilistic context encoder (Rakelly et al., 2019).

Each transition ``c_n = (s, a, r, s')`` is mapped by an MLP to a Gaussian factor
``Psi(z | c_n) = N(mu_n, diag(sigma_n^2))``. The posterior over the task latent is their
normalized product (the factors are independent given the task)::

    sigma^2 = 1 / sum_n (1 / sigma_n^2)
    mu      = sigma^2 * sum_n (mu_n / sigma_n^2)

It is trained through the critic's Bellman loss plus ``beta * KL(q(z|c) || N(0, I))``.

``s'`` is part of the context on purpose: our tasks differ in dynamics (payload, motors,
friction), which only show in how the state responds to the action.

:class:`StreamingPosterior` is the deployment form: each new transition is encoded once into its
factor, the last ``K`` factors are kept, and the product over them is exactly the batch
posterior over the same window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from metarl_ros.learning.networks import mlp

MIN_FACTOR_VAR = 1e-4


def product_of_gaussians(
    mu: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of diagonal Gaussian factors over the second-to-last dimension.

    Args:
        mu, var: factors, shape (..., N, L).
        mask: optional (..., N) with 1 for factors to include and 0 to ignore. An all-zero row
            gives the standard normal prior (the empty product is taken with the prior).

    Returns:
        Posterior mean and variance, each (..., L). Without a mask, the prior is not part of
        the product (as in PEARL); with a mask, rows that have no factor fall back to it.
    """
    precision = 1.0 / var
    if mask is not None:
        precision = precision * mask.unsqueeze(-1)
        empty = mask.sum(-1, keepdim=True) == 0  # (..., 1)
        precision_sum = precision.sum(-2) + empty.to(mu.dtype)
        mean = (precision * mu).sum(-2) / precision_sum
        return mean, 1.0 / precision_sum
    precision_sum = precision.sum(-2)
    posterior_var = 1.0 / precision_sum
    return posterior_var * (precision * mu).sum(-2), posterior_var


def windowed_posterior(
    mu: torch.Tensor, var: torch.Tensor, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Products of Gaussian factors over many windows of one sequence at once.

    Args:
        mu, var: factors of a sequence of transitions, shape (..., W, L).
        windows: (..., M, W), row m is 1 for the factors in the m-th window and 0 elsewhere.

    Returns:
        Posterior mean and variance of each window, each (..., M, L): row m equals
        ``product_of_gaussians(mu, var, windows[..., m, :])``, empty windows giving the prior.
        Overlapping windows share the factors, so each transition is encoded once.
    """
    precision = 1.0 / var
    empty = (windows.sum(-1, keepdim=True) == 0).to(mu.dtype)  # (..., M, 1)
    precision_sum = windows @ precision + empty
    mean = (windows @ (precision * mu)) / precision_sum
    return mean, 1.0 / precision_sum


@dataclass
class TrailingContexts:
    """Contexts exactly as deployed, one per RL transition: the posterior the policy acted
    with at step ``t`` is the product over the (up to ``K``) transitions before ``t`` in the
    same episode, and the one it acts with at ``t + 1`` also includes transition ``t``.

    The RL transitions come in segments of ``M`` consecutive steps; each segment's sequence
    holds the ``K`` transitions before it too (``W = K + M``), so that overlapping windows
    share their factors.

    Shapes: transitions (T, S, W, D) for T tasks of S segments; windows and next_windows
    (T, S, M, W), the masks of the windows for the segment's m-th RL transition and for its
    next state.
    """

    transitions: torch.Tensor
    windows: torch.Tensor
    next_windows: torch.Tensor

    def posteriors(
        self, encoder: "ContextEncoder"
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(mean, variance) at each RL transition and at its next state, each (T, S*M, L);
        gradients flow to the encoder through both."""
        mu, var = encoder.factors(self.transitions)
        now = windowed_posterior(mu, var, self.windows)
        after = windowed_posterior(mu, var, self.next_windows)
        return tuple(x.flatten(1, 2) for x in now), tuple(x.flatten(1, 2) for x in after)


def trailing_windows(
    episode_step: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window masks of :class:`TrailingContexts` from the step index of each transition in its
    episode.

    Args:
        episode_step: (..., W) step index within its episode of each transition of the
            sequences (consecutive in time, W > window).
        window: K, the deployed context window.

    Returns:
        windows, next_windows: (..., W - K, W). The RL transition at position ``j = K + m``
        was acted on with the transitions ``j - K .. j - 1``, its next state with
        ``j - K + 1 .. j``, each limited to its own episode (``j - p <= episode_step[j]``).
    """
    length = episode_step.shape[-1]
    if length <= window:
        raise ValueError(f"sequences of {length} transitions hold no RL transition after a "
                         f"window of {window}")
    target = torch.arange(window, length)[:, None]  # (M, 1) positions j
    source = torch.arange(length)[None, :]  # (1, W) positions p
    lag = target - source  # (M, W): j - p
    in_episode = lag <= episode_step[..., window:, None]  # (..., M, W)
    windows = ((lag >= 1) & (lag <= window) & in_episode).to(torch.float32)
    next_windows = ((lag >= 0) & (lag <= window - 1) & in_episode).to(torch.float32)
    return windows, next_windows


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag var) || N(0, I)), summed over the last dimension. (..., L) -> (...)."""
    return 0.5 * (var + mu.pow(2) - 1.0 - var.log()).sum(-1)


class ContextEncoder(nn.Module):
    """Maps transitions to Gaussian factors over the task latent ``z``.

    Args:
        transition_dim: size of one flattened ``(s, a, r, s')`` vector.
        latent_dim: size of ``z``.
        hidden: hidden layer widths.
    """

    def __init__(self, transition_dim: int, latent_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp(transition_dim, hidden, 2 * latent_dim)

    def factors(self, transitions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transitions (..., D) -> factor means (..., L) and variances (..., L)."""
        out = self.net(transitions)
        mu, raw_var = out[..., : self.latent_dim], out[..., self.latent_dim :]
        return mu, F.softplus(raw_var) + MIN_FACTOR_VAR

    def posterior(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context (T, N, D) [, mask (T, N)] -> posterior mean (T, L), variance (T, L)."""
        mu, var = self.factors(context)
        return product_of_gaussians(mu, var, mask)


def make_transition(
    obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor
) -> torch.Tensor:
    """Flatten ``(s, a, r, s')`` into the encoder input. reward has shape (...,) or (..., 1)."""
    if reward.dim() == obs.dim() - 1:
        reward = reward.unsqueeze(-1)
    return torch.cat([obs, action, reward, next_obs], dim=-1)


class StreamingPosterior:
    """Posterior over a sliding window of the last ``window`` transitions.

    ``push`` encodes one transition (or one per row of a batch of independent streams is not
    supported: keep one instance per stream). Factors are stored, so the posterior is the exact
    product over the window, equal to :meth:`ContextEncoder.posterior` on the same transitions.
    An empty window gives the prior N(0, I).
    """

    def __init__(self, encoder: ContextEncoder, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.encoder = encoder
        self.window = window
        self._mu: deque[torch.Tensor] = deque(maxlen=window)
        self._var: deque[torch.Tensor] = deque(maxlen=window)
        self._posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # until the next push

    def __len__(self) -> int:
        return len(self._mu)

    def reset(self) -> None:
        self._mu.clear()
        self._var.clear()
        self._posterior = None

    @torch.no_grad()
    def push(self, transition: torch.Tensor) -> None:
        """Add one flattened transition, shape (D,)."""
        mu, var = self.encoder.factors(transition)
        self._mu.append(mu)
        self._var.append(var)
        self._posterior = None

    @torch.no_grad()
    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance, each (L,). Computed once per push (the control loop asks for it
        several times per tick: MAML's record, the action, the published latent)."""
        if self._posterior is None:
            if not self._mu:
                latent = self.encoder.latent_dim
                self._posterior = torch.zeros(latent), torch.ones(latent)
            else:
                self._posterior = product_of_gaussians(torch.stack(list(self._mu)),
                                                       torch.stack(list(self._var)))
        return self._posterior


class BatchedWindows:
    """Sliding windows of factors for ``num_streams`` parallel environments.

    Used for vectorized data collection: one encoder call per step encodes the newest
    transition of every stream. Posterior per stream equals :class:`StreamingPosterior`'s.
    """

    def __init__(self, num_streams: int, window: int, latent_dim: int) -> None:
        self.window = window
        self._mu = torch.zeros(num_streams, window, latent_dim)
        self._var = torch.ones(num_streams, window, latent_dim)
        self._mask = torch.zeros(num_streams, window)
        self._next = torch.zeros(num_streams, dtype=torch.long)

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Empty the windows of ``streams`` (indices), or all."""
        index = slice(None) if streams is None else streams
        self._mask[index] = 0.0
        self._next[index] = 0

    def push(self, mu: torch.Tensor, var: torch.Tensor) -> None:
        """Add one factor per stream: mu, var (S, L)."""
        rows = torch.arange(self._mu.shape[0])
        slot = self._next % self.window
        self._mu[rows, slot] = mu
        self._var[rows, slot] = var
        self._mask[rows, slot] = 1.0
        self._next += 1

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance per stream, each (S, L); empty windows give the prior."""
        return product_of_gaussians(self._mu, self._var, self._mask)

    def fill(self) -> torch.Tensor:
        """Number of transitions in each window, (S,)."""
        return self._mask.sum(-1)
