"""Meta-batches from the per-task replay: the training tasks of an update, their RL
transitions and (PEARL) the contexts the posterior is computed from.

By ``context_sampling`` a task's RL transitions are conditioned either on one context of
consecutive transitions for all of them (``task``, PEARL's; random fill
``min_context..context_window``, as the window is after a reset or a fault) or each on its own
trailing window in its episode (``trailing``, the deployed posterior).
"""

from __future__ import annotations

import numpy as np
import torch

from metarl_ros.learning.config import TrainConfig
from metarl_ros.learning.encoder import TrailingContexts, make_transition, trailing_windows
from metarl_ros.learning.replay import MultiTaskReplay
from metarl_ros.learning.transitions import TransitionBatch

MetaBatch = tuple[
    TransitionBatch, torch.Tensor | TrailingContexts | None, torch.Tensor | None,
    torch.Tensor | None,
]
"""``(batch, context, context_mask, task_condition)``, the arguments of
:meth:`~metarl_ros.learning.agent.ConditionedSAC.update`."""


class ReplaySampler:
    """Draws from ``replay`` (one buffer per training task) with the trainer's ``rng``."""

    def __init__(
        self, replay: MultiTaskReplay, rng: np.random.Generator, config: TrainConfig
    ) -> None:
        self.replay = replay
        self.rng = rng
        self.config = config

    @property
    def num_tasks(self) -> int:
        return len(self.replay.tasks)

    def task_ids(self, count: int) -> list[int]:
        """``count`` training task ids, uniform over the split (without replacement when the
        split is large enough)."""
        ids = self.rng.choice(self.num_tasks, size=count, replace=self.num_tasks < count)
        return [int(i) for i in ids.tolist()]

    def consecutive_index(self, task_id: int, length: int) -> np.ndarray:
        """Buffer rows of ``length`` consecutive transitions of a task, oldest first."""
        buffer = self.replay.tasks[task_id]
        newest_offset = int(self.rng.integers(0, max(1, buffer.size - length + 1)))
        return (buffer.cursor - 1 - newest_offset - np.arange(length)[::-1]) % buffer.capacity

    def meta_batch(self, task_ids: list[int], conditioning: str) -> MetaBatch:
        """``batch_size`` RL transitions of each task and what they are conditioned on."""
        c = self.config
        context = mask = task_condition = None
        if conditioning == "latent" and c.context_sampling == "trailing":
            batch, context = self.trailing(task_ids)
        elif conditioning == "oracle":
            # each transition with the true task vector it was acted on (T, B, C)
            index = self.replay.sample_index(task_ids, c.batch_size, self.rng)
            batch = self.replay.batch_at(task_ids, index)
            task_condition = self.replay.gather(task_ids, index, "condition")
        else:
            batch = self.replay.sample(task_ids, c.batch_size, self.rng)
        if conditioning == "latent" and c.context_sampling == "task":
            context, mask = self.context(task_ids)
        return batch, context, mask, task_condition

    def context(self, task_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive windows: context (T, K, D) and mask (T, K) with random fill."""
        k = self.config.context_window
        rows = []
        for task_id in task_ids:
            buffer = self.replay.tasks[task_id]
            index = self.consecutive_index(task_id, k)
            rows.append(
                np.concatenate(
                    [
                        buffer.obs[index],
                        buffer.action[index],
                        buffer.reward[index, None],
                        buffer.next_obs[index],
                    ],
                    -1,
                )
            )
        context = torch.from_numpy(np.stack(rows))
        fill = self.rng.integers(self.config.min_context, k + 1, size=len(task_ids))
        mask = torch.from_numpy((np.arange(k)[None, :] >= (k - fill)[:, None]).astype(np.float32))
        return context, mask

    def trailing(self, task_ids: list[int]) -> tuple[TransitionBatch, TrailingContexts]:
        """RL transitions with their deployed contexts (``context_sampling: trailing``).

        Per task, ``context_segments`` runs of ``M = batch_size / context_segments``
        consecutive transitions, each with the ``context_window`` transitions before it.
        Returns the batch (T, batch_size) in segment order and its :class:`TrailingContexts`.
        """
        c = self.config
        segments, k = c.context_segments, c.context_window
        length = k + c.batch_size // segments
        index = [
            np.stack([self.consecutive_index(task_id, length) for _ in range(segments)])
            for task_id in task_ids
        ]  # per task (S, W) buffer rows, oldest first
        seq = self.replay.batch_at(task_ids, index)  # (T, S, W, ...)
        windows, next_windows = trailing_windows(
            self.replay.gather(task_ids, index, "episode_step"), k
        )
        contexts = TrailingContexts(
            make_transition(seq.obs, seq.action, seq.reward, seq.next_obs), windows, next_windows
        )
        tail = slice(k, None)
        batch = TransitionBatch(
            obs=seq.obs[:, :, tail].flatten(1, 2),
            action=seq.action[:, :, tail].flatten(1, 2),
            reward=seq.reward[:, :, tail].flatten(1, 2),
            next_obs=seq.next_obs[:, :, tail].flatten(1, 2),
            teacher=None if seq.teacher is None else seq.teacher[:, :, tail].flatten(1, 2),
        )
        return batch, contexts
