"""Transitions of bags, and how they are grouped into tasks for ``metarl retrain``.

Part of :mod:`metarl_ros.learning.bag_dataset`: the containers it fills
(:class:`BagTransitions`, :class:`TaskEvent`) and the grouping (:func:`build_tasks`): at
recorded fault events (:func:`split_by_events`) or, without events, at change points of the
encoder's streaming posterior (:func:`posterior_change_points`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from metarl_ros.core.schema import StrictModel
from metarl_ros.sim.tasks import TaskParams


class SegmentationConfig(StrictModel):
    """Task splitting when a bag has no fault events (posterior change points)."""

    jump_ratio: PositiveFloat = Field(
        default=4.0, description="a change point needs a window-to-window posterior shift this "
        "many times the bag's median shift")
    min_shift: NonNegativeFloat = Field(
        default=1.0, description="... and at least this shift, in posterior std (RMS)")
    min_segment_steps: PositiveInt = Field(default=50,
                                           description="shortest task segment, transitions")



@dataclass
class TaskEvent:
    """A recorded true task change (sim time, s)."""

    time_s: float
    task: TaskParams
    label: str


@dataclass
class BagTransitions:
    """Transitions rebuilt from one bag, in time order.

    obs/next_obs (M, obs_dim) float32, action (M, act_dim) float32, reward (M,) float32,
    time_s (M,) float64: the control instant of ``s`` on the bag's time axis.
    """

    path: Path
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    time_s: np.ndarray
    step_end_s: np.ndarray
    """(M,) the instant of ``s'`` (a fault striking before it belongs to this step)."""
    events: list[TaskEvent]
    control_instants: int
    start_s: float
    end_s: float
    topics: dict[str, tuple[str, int]]
    """every topic in the bag: (type, messages)."""
    read_messages: int
    dropped: Counter = field(default_factory=Counter)
    """reason -> count (messages, commands, control instants or transitions, as named)."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def __len__(self) -> int:
        return len(self.reward)


@dataclass
class TaskData:
    """Transitions of one task (possibly from several bags); arrays as in BagTransitions."""

    name: str
    task: TaskParams | None
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return len(self.reward)



def split_by_events(bag: BagTransitions) -> list[tuple[TaskParams, str, np.ndarray]]:
    """``(task, label, transition indices)`` per recorded task (needs ``bag.events``).

    A transition belongs to the task in force at the end of its step: a fault that strikes
    during the step (at ``time < step end``) already shaped ``s'``.
    """
    if not bag.events:
        return []
    times = np.asarray([e.time_s for e in bag.events])
    which = np.searchsorted(times, bag.step_end_s - 1e-9, side="left") - 1
    out = []
    for e_index in np.unique(which):
        rows = np.flatnonzero(which == e_index)
        if e_index < 0:  # before the first event: the task is unknown
            continue
        event = bag.events[int(e_index)]
        out.append((event.task, event.label or f"event {e_index}", rows))
    return out


def posterior_change_points(mean: np.ndarray, std: np.ndarray, window: int,
                            config: SegmentationConfig = SegmentationConfig()) -> list[int]:
    """Indices where a new task starts, from a streaming posterior (mean, std: (M, L)).

    Two-window test: the posterior over the window ending at step t (transitions
    ``t-K+1 .. t``) is compared with the one over the window before it (ending at ``t - K``):
    ``d_t = RMS((mu_t - mu_{t-K}) / std_t)``. A task change makes ``d`` peak when the newer
    window holds only the new task and the older one only the old task, i.e. the change is at
    ``t - K + 1``; a peak above ``jump_ratio`` times the median ``d`` (and above
    ``min_shift``) starts a task there. Change points are at least ``min_segment_steps`` apart.
    """
    m = len(mean)
    k = window
    if m < 2 * k + 1:
        return []
    d = np.zeros(m)
    scale = np.maximum(std[k:], 1e-6)
    d[k:] = np.sqrt((((mean[k:] - mean[:-k]) / scale) ** 2).mean(1))
    d[: 2 * k] = 0.0  # the first window is still filling
    threshold = max(config.jump_ratio * float(np.median(d[2 * k:])), config.min_shift)
    points: list[int] = []
    candidates = np.argsort(-d)
    for t in candidates:
        if d[t] <= threshold:
            break
        start = int(t) - k + 1
        if start < config.min_segment_steps or m - start < config.min_segment_steps:
            continue
        if all(abs(start - p) >= config.min_segment_steps for p in points):
            points.append(start)
    return sorted(points)


def streaming_posterior(encoder, bag: BagTransitions,
                        window: int) -> tuple[np.ndarray, np.ndarray]:
    """The deployed posterior over each bag position: mean, std (M, L).

    Equal to :class:`~metarl_ros.learning.encoder.StreamingPosterior` fed the transitions in
    order (product of the last ``window`` factors), computed with cumulative sums.
    """
    import torch

    from metarl_ros.learning.encoder import make_transition

    with torch.no_grad():
        transitions = make_transition(torch.from_numpy(bag.obs), torch.from_numpy(bag.action),
                                      torch.from_numpy(bag.reward), torch.from_numpy(bag.next_obs))
        mu, var = encoder.factors(transitions)
    precision = (1.0 / var).double().numpy()
    weighted = (mu.double() / var.double()).numpy()
    cp = np.vstack([np.zeros((1, precision.shape[1])), np.cumsum(precision, 0)])
    cw = np.vstack([np.zeros((1, weighted.shape[1])), np.cumsum(weighted, 0)])
    end = np.arange(1, len(precision) + 1)
    start = np.maximum(end - window, 0)
    p = cp[end] - cp[start]
    w = cw[end] - cw[start]
    return w / p, np.sqrt(1.0 / p)


def build_tasks(bags: Sequence[BagTransitions], encoder=None, window: int = 25,
                segmentation: SegmentationConfig = SegmentationConfig()
                ) -> tuple[list[TaskData], dict[str, str]]:
    """Group transitions into tasks; returns the tasks and, per bag, how it was split.

    Bags with fault events are split at them, equal tasks merged across bags. Other bags are
    split at posterior change points when an ``encoder`` is given, else kept whole.
    """
    by_key: dict[str, TaskData] = {}
    order: list[str] = []
    how: dict[str, str] = {}

    def add(key: str, name: str, task: TaskParams | None, bag: BagTransitions,
            rows: np.ndarray) -> None:
        if key not in by_key:
            by_key[key] = TaskData(name, task, bag.obs[rows], bag.action[rows], bag.reward[rows],
                                   bag.next_obs[rows], [str(bag.path)])
            order.append(key)
            return
        data = by_key[key]
        data.obs = np.concatenate([data.obs, bag.obs[rows]])
        data.action = np.concatenate([data.action, bag.action[rows]])
        data.reward = np.concatenate([data.reward, bag.reward[rows]])
        data.next_obs = np.concatenate([data.next_obs, bag.next_obs[rows]])
        if str(bag.path) not in data.sources:
            data.sources.append(str(bag.path))

    for b, bag in enumerate(bags):
        if not len(bag):
            how[str(bag.path)] = "no transitions"
            continue
        parts = split_by_events(bag)
        if parts:
            how[str(bag.path)] = f"fault events ({len(parts)} tasks)"
            for task, label, rows in parts:
                add(task.key(), label, task, bag, rows)
            continue
        points: list[int] = []
        if encoder is not None:
            mean, std = streaming_posterior(encoder, bag, window)
            points = posterior_change_points(mean, std, window, segmentation)
            how[str(bag.path)] = f"posterior change points ({len(points) + 1} segments)"
        else:
            how[str(bag.path)] = "no events, no encoder: one task"
        bounds = [0, *points, len(bag)]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            add(f"bag{b}:segment{s}", f"{bag.path.name} segment {s}", None, bag,
                np.arange(lo, hi))
    return [by_key[k] for k in order], how
