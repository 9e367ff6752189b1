"""Per-task replay buffers (PEARL keeps one per training task)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metarl_ros.control.model_features import num_fault_parameters
from metarl_ros.learning.transitions import TransitionBatch

_FIELDS = ("obs", "action", "reward", "next_obs")
_STORED = (*_FIELDS, "episode_step")


class TaskReplay:
    """A ring buffer of one task's transitions (float32 numpy storage), in the order they
    happened, with each transition's step index in its episode (``episode_step``: 0 at a
    reset), which tells where a window of consecutive transitions crosses into an earlier
    episode. With ``cond_dim > 0`` it also keeps the condition each transition was acted on
    (the oracle's true task vector, which changes at a mid-episode fault); with ``teacher``
    each action's privileged targets (``teacher``, (act_dim + 3 act_dim + 10,): the label,
    then the true fault parameters; :meth:`metarl_ros.sim.env.ArmTrackingEnv.teacher_targets`).
    """

    def __init__(
        self, capacity: int, obs_dim: int, act_dim: int, cond_dim: int = 0, teacher: bool = False
    ) -> None:
        self.capacity = capacity
        self.fields = (_STORED + (("condition",) if cond_dim else ())
                       + (("teacher",) if teacher else ()))
        self.condition = np.zeros((capacity, cond_dim), np.float32)
        width = act_dim + num_fault_parameters(act_dim) if teacher else 0
        self.teacher = np.zeros((capacity, width), np.float32)
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros((capacity,), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.episode_step = np.zeros((capacity,), np.int64)
        self.size = 0
        self.cursor = 0

    def add(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        episode_step: np.ndarray | None = None,
        condition: np.ndarray | None = None,
        teacher: np.ndarray | None = None,
    ) -> None:
        """Append a chunk of transitions, arrays with leading dim M. ``episode_step``
        defaults to ``0 .. M-1``: the chunk is one whole episode from its reset;
        ``condition`` (M, cond_dim) and ``teacher`` (M, 4 act_dim + 10) are required when the
        buffer keeps them."""
        count = len(reward)
        index = (self.cursor + np.arange(count)) % self.capacity
        self.obs[index] = obs
        self.action[index] = action
        self.reward[index] = reward
        self.next_obs[index] = next_obs
        self.episode_step[index] = np.arange(count) if episode_step is None else episode_step
        if "condition" in self.fields:
            if condition is None:
                raise ValueError("this buffer keeps each transition's condition: pass it")
            self.condition[index] = condition
        if "teacher" in self.fields:
            if teacher is None:
                raise ValueError("this buffer keeps each action's teacher label: pass it")
            self.teacher[index] = teacher
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
                for name in self.fields
            },
            "meta": np.array([self.size, self.cursor], dtype=np.int64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        size, cursor = (int(v) for v in state["meta"])
        missing = [name for name in self.fields if name not in state]
        if missing:
            raise ValueError(
                f"replay state has no {', '.join(missing)} (written by a metarl_ros that did "
                "not store it): resume that run with the version that wrote it, or start a "
                "new --out"
            )
        for name in self.fields:
            getattr(self, name)[:size] = state[name]
        self.size, self.cursor = size, cursor


class MultiTaskReplay:
    """One :class:`TaskReplay` per task id, with stacked sampling across tasks."""

    def __init__(
        self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int, cond_dim: int = 0,
        teacher: bool = False,
    ) -> None:
        self.tasks = [TaskReplay(capacity, obs_dim, act_dim, cond_dim, teacher)
                      for _ in range(num_tasks)]

    def __len__(self) -> int:
        return sum(t.size for t in self.tasks)

    def add(
        self, task_id: int, obs, action, reward, next_obs, episode_step=None, condition=None,
        teacher=None,
    ) -> None:
        self.tasks[task_id].add(obs, action, reward, next_obs, episode_step, condition, teacher)

    def sample_index(
        self, task_ids: list[int], count: int, rng: np.random.Generator, recent: int | None = None
    ) -> list[np.ndarray]:
        """``count`` random buffer rows of each task."""
        return [self.tasks[task_id].sample_index(count, rng, recent) for task_id in task_ids]

    def gather(self, task_ids: list[int], index: list[np.ndarray], name: str) -> torch.Tensor:
        """Field ``name`` at the rows ``index`` of each task, stacked: (T, count, ...)."""
        return torch.from_numpy(
            np.stack([getattr(self.tasks[t], name)[rows] for t, rows in zip(task_ids, index)])
        )

    def batch_at(self, task_ids: list[int], index: list[np.ndarray]) -> TransitionBatch:
        """The transitions at the rows ``index`` of each task: leading dims (T, *rows.shape),
        with their teacher labels if the buffers keep them."""
        names = _FIELDS + (("teacher",) if "teacher" in self.tasks[0].fields else ())
        return TransitionBatch(**{name: self.gather(task_ids, index, name) for name in names})

    def sample(
        self, task_ids: list[int], count: int, rng: np.random.Generator, recent: int | None = None
    ) -> TransitionBatch:
        """``count`` transitions from each task: tensors with leading dims (T, count)."""
        return self.batch_at(task_ids, self.sample_index(task_ids, count, rng, recent))

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
                buffer.load_state(
                    {key: data[f"{i}/{key}"] for key in (*buffer.fields, "meta")
                     if f"{i}/{key}" in data}
                )
