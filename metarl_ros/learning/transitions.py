""":class:`TransitionBatch`: the one container of transitions ``(obs, action[, reward]) ->
next_obs`` (optionally with a task latent) that replay, SAC updates and MAML share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class TransitionBatch:
    """Transitions with any leading dims ``L`` (``(T, N)`` for T tasks of N samples as the
    replay samples them, ``(B,)`` for MAML): ``obs`` and ``next_obs`` ``(*L, obs_dim)``,
    ``action`` ``(*L, act_dim)``, optionally ``reward`` ``(*L,)``, ``latent`` ``(*L,
    latent_dim)`` (the task latent ``z`` a dynamics model is conditioned on) and ``teacher``
    ``(*L, act_dim + P)`` (the privileged label of the action, :mod:`metarl_ros.sim.teacher`,
    then the P true fault parameters; ``P = 0`` is allowed).

    Indexing, ``len`` and :meth:`cat` act on the first leading dim. For
    :class:`~metarl_ros.learning.online_adapter.OnlineAdapter` the rows are in time order
    (oldest first): the most recent rows form the held-out part.
    """

    obs: Tensor
    action: Tensor
    next_obs: Tensor
    reward: Tensor | None = None
    latent: Tensor | None = None
    teacher: Tensor | None = None

    def __post_init__(self) -> None:
        if self.obs.dim() < 2:
            raise ValueError(
                f"TransitionBatch: obs must be (..., obs_dim) with a batch dim, got shape "
                f"{tuple(self.obs.shape)}"
            )
        lead = self.obs.shape[:-1]
        if self.next_obs.shape != self.obs.shape:
            raise ValueError("TransitionBatch: next_obs must have the shape of obs")
        if self.action.dim() != self.obs.dim() or self.action.shape[:-1] != lead:
            raise ValueError(
                f"TransitionBatch: obs and action differ in batch shape ("
                f"{tuple(self.obs.shape)} vs {tuple(self.action.shape)})"
            )
        if self.reward is not None and self.reward.shape != lead:
            raise ValueError(
                f"TransitionBatch: reward must have shape {tuple(lead)}, got "
                f"{tuple(self.reward.shape)}"
            )
        if self.latent is not None and (
            self.latent.dim() != self.obs.dim() or self.latent.shape[:-1] != lead
        ):
            raise ValueError("TransitionBatch: latent must be (..., latent_dim) with obs's batch "
                             "shape")
        if self.teacher is not None and (
            self.teacher.shape[:-1] != self.action.shape[:-1]
            or self.teacher.shape[-1] < self.action.shape[-1]
        ):
            raise ValueError(
                f"TransitionBatch: teacher must be (..., >= act_dim) with action's batch shape "
                f"{tuple(self.action.shape)}, got {tuple(self.teacher.shape)}"
            )

    def _map(self, fn: Any) -> TransitionBatch:
        """The batch with ``fn`` applied to every field that is present."""
        return TransitionBatch(
            **{f.name: None if (v := getattr(self, f.name)) is None else fn(v)
               for f in fields(self)}
        )

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def __getitem__(self, index: int | slice | Tensor) -> TransitionBatch:
        """Rows selected by an int, a slice, an index tensor or a mask (keeps the dims)."""
        if isinstance(index, int):
            index = slice(index, (index + 1) or None)
        return self._map(lambda x: x[index])

    def to(self, *args: Any, **kwargs: Any) -> TransitionBatch:
        """Same as :meth:`torch.Tensor.to` applied to every field."""
        return self._map(lambda x: x.to(*args, **kwargs))

    def flatten(self) -> TransitionBatch:
        """``(T, N, ...)`` -> ``(T*N, ...)``."""
        return self._map(lambda x: x.flatten(0, 1))

    @staticmethod
    def cat(batches: Sequence[TransitionBatch]) -> TransitionBatch:
        """Concatenate along the first dim (each optional field in all batches or in none)."""
        if not batches:
            raise ValueError("TransitionBatch.cat: need at least one batch")
        parts: dict[str, Tensor | None] = {}
        for f in fields(TransitionBatch):
            values = [getattr(b, f.name) for b in batches]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise ValueError(f"TransitionBatch.cat: mixing batches with and without {f.name}")
            parts[f.name] = torch.cat(values) if all(present) else None
        return TransitionBatch(**parts)
