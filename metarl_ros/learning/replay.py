"""Per-task replay buffers (PEARL keeps one per training task)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_FIELDS = ("obs", "action", "reward", "next_obs")


@dataclass
class TransitionBatch:
    """Transitions, leading dims (T, N) for T tasks of N samples (or (N,) for one task).

    obs/next_obs (..., obs_dim), action (..., act_dim), reward (...,).
    """

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor

    def flatten(self) -> "TransitionBatch":
        """(T, N, ...) -> (T*N, ...)."""
        return TransitionBatch(
            self.obs.flatten(0, 1),
            self.action.flatten(0, 1),
            self.reward.flatten(0, 1),
            self.next_obs.flatten(0, 1),
        )


class TaskReplay:
    """A ring buffer of one task's transitions (float32 numpy storage)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros((capacity,), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.size = 0
        self.cursor = 0

    def add(
        self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray
    ) -> None:
        """Append a chunk of transitions, arrays with leading dim M."""
        count = len(reward)
        index = (self.cursor + np.arange(count)) % self.capacity
        self.obs[index] = obs
        self.action[index] = action
        self.reward[index] = reward
        self.next_obs[index] = next_obs
        self.cursor = int((self.cursor + count) % self.capacity)
        self.size = min(self.size + count, self.capacity)

    def sample_index(self, count: int, rng: np.random.Generator, recent: int | None = None):
        """Random indices; ``recent`` restricts them to the newest ``recent`` transitions."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        span = self.size if recent is None else min(recent, self.size)
        offsets = rng.integers(0, span, size=count)
        return (self.cursor - 1 - offsets) % self.capacity

    def state(self) -> dict[str, np.ndarray]:
        return {
            **{
                name: getattr(self, name)[: self.size]
                if self.size < self.capacity
                else getattr(self, name)
                for name in _FIELDS
            },
            "meta": np.array([self.size, self.cursor], dtype=np.int64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        size, cursor = (int(v) for v in state["meta"])
        for name in _FIELDS:
            getattr(self, name)[:size] = state[name]
        self.size, self.cursor = size, cursor


class MultiTaskReplay:
    """One :class:`TaskReplay` per task id, with stacked sampling across tasks."""

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int) -> None:
        self.tasks = [TaskReplay(capacity, obs_dim, act_dim) for _ in range(num_tasks)]

    def __len__(self) -> int:
        return sum(t.size for t in self.tasks)

    def add(self, task_id: int, obs, action, reward, next_obs) -> None:
        self.tasks[task_id].add(obs, action, reward, next_obs)

    def sample(
        self, task_ids: list[int], count: int, rng: np.random.Generator, recent: int | None = None
    ) -> TransitionBatch:
        """``count`` transitions from each task: tensors with leading dims (T, count)."""
        parts = {name: [] for name in _FIELDS}
        for task_id in task_ids:
            buffer = self.tasks[task_id]
            index = buffer.sample_index(count, rng, recent)
            for name in _FIELDS:
                parts[name].append(getattr(buffer, name)[index])
        return TransitionBatch(
            **{name: torch.from_numpy(np.stack(parts[name])) for name in _FIELDS}
        )

    def save(self, path: Path) -> None:
        """Write all buffers to ``path`` (an ``.npz``); the caller makes it atomic."""
        arrays = {}
        for i, buffer in enumerate(self.tasks):
            for key, value in buffer.state().items():
                arrays[f"{i}/{key}"] = value
        with open(path, "wb") as stream:
            np.savez(stream, **arrays)

    def load(self, path: Path) -> None:
        with np.load(path) as data:
            for i, buffer in enumerate(self.tasks):
                buffer.load_state({key: data[f"{i}/{key}"] for key in (*_FIELDS, "meta")})
