"""Intervals that resample what varies: tasks, then episodes; training runs are averaged.

A result of a suite condition is a mean over episodes that cluster by task: two episodes of
one task (another reference trajectory, another fault time) are far more alike than episodes
of two tasks. Resampling episodes alone treats the tasks as fixed and gives intervals that are
too narrow for a claim about the *distribution* of tasks (the fault: a new draw of tasks moved
the shipped ood score outside its interval). The **hierarchical bootstrap** here draws, per
resample, as many tasks as there are with replacement, then within each drawn task as many of
its episodes as it has, with replacement. Every method is evaluated on the same episodes, so
one set of resamples (:func:`bootstrap_weights`) serves every method and every paired
difference: a paired difference is the bootstrap of the per-episode differences, which removes
the variation that methods share (hard tasks are hard for all).

Several training runs of a method (``--model A B ...``) are averaged per episode before the
bootstrap (the interval is over tasks and episodes for the method's *mean* policy); the spread
between runs is reported beside it, per run. With two or three runs a bootstrap over runs
would say nothing.

Intervals are percentile intervals (2.5 %, 97.5 %) of :data:`RESAMPLES` resamples drawn from a
seeded generator: the same data and seed give the same interval to the last digit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate (on the data as drawn) and its bootstrap interval."""

    value: float
    low: float
    high: float

    def to_json(self) -> dict:
        return {"mean": self.value, "ci95": [self.low, self.high]}


def cluster_ids(keys: Sequence[Hashable]) -> np.ndarray:
    """Integer ids (0, 1, ... in order of first appearance) of the episodes' task keys."""
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def bootstrap_weights(
    clusters: np.ndarray, resamples: int = RESAMPLES, seed: int | Sequence[int] = 0
) -> np.ndarray:
    """How often each episode is drawn in each hierarchical resample, shape (resamples, N).

    Args:
        clusters: (N,) task id of each episode.

    Row ``r``: draw T tasks with replacement (T = number of distinct tasks); for each drawn
    task with n episodes, draw n of its episodes with replacement. A resampled mean of episode
    values ``x`` is ``w @ x / w.sum()``.
    """
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    tasks, inverse = np.unique(clusters, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # episodes grouped by task
    sizes = np.bincount(inverse, minlength=len(tasks))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    count, largest = len(tasks), int(sizes.max())
    chosen = rng.integers(0, count, size=(resamples, count))  # (R, T)
    n = sizes[chosen][..., None]  # (R, T, 1)
    within = np.floor(rng.random((resamples, count, largest)) * n).astype(np.int64)
    valid = np.arange(largest)[None, None, :] < n  # a task draws only its own count
    episode = order[offsets[chosen][..., None] + np.minimum(within, n - 1)]
    weights = np.zeros((resamples, len(clusters)))
    rows = np.broadcast_to(np.arange(resamples)[:, None, None], episode.shape)
    np.add.at(weights, (rows[valid], episode[valid]), 1.0)
    return weights


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    finite = samples[np.isfinite(samples)]
    if finite.size < samples.size or finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def resampled_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of ``values`` (N,) in each resample, (R,)."""
    return weights @ np.asarray(values, dtype=np.float64) / weights.sum(axis=1)


def mean_estimate(values: np.ndarray, weights: np.ndarray) -> Estimate:
    """Mean of per-episode ``values`` (N,) with its hierarchical-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    return Estimate(float(values.mean()), *_interval(resampled_means(values, weights)))


def paired_difference(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> Estimate:
    """Mean of ``a - b`` over the same episodes (each (N,)) with its interval."""
    return mean_estimate(np.asarray(a, float) - np.asarray(b, float), weights)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """Per resample, the smallest of ``values`` (N,) whose weighted share of values at or below
    it *exceeds* ``q`` (for the median of an even count: the upper middle value, the cautious
    side when half the episodes never recover), weights from each row of ``weights`` (R, N);
    values may be ``inf``. Shape (R,)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[:, order], axis=1)
    target = q * cumulative[:, -1:]
    index = np.minimum((cumulative <= target + 1e-9).sum(axis=1), len(order) - 1)
    return np.asarray(values, dtype=np.float64)[order][index]


def median_estimate(values: np.ndarray, weights: np.ndarray) -> Estimate:
    """Median of ``values`` (N,; ``inf`` allowed) with its interval (which may be ``inf``)."""
    values = np.asarray(values, dtype=np.float64)
    point = weighted_quantile(values, np.ones((1, values.size)), 0.5)[0]
    samples = weighted_quantile(values, weights, 0.5)
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail], method="nearest")
    return Estimate(float(point), float(low), float(high))


def ratio_estimate(
    numerator: np.ndarray, denominator: np.ndarray, weights: np.ndarray
) -> Estimate:
    """``mean(numerator) / mean(denominator)`` over the same episodes, with its interval
    (resampled jointly, so the correlation of the two is kept)."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = resampled_means(num, weights) / resampled_means(den, weights)
    return Estimate(float(num.mean() / den.mean()), *_interval(samples))


def across_runs(values: np.ndarray) -> dict:
    """Per-run means of ``values`` (runs, N) and their spread (max - min)."""
    per_run = np.asarray(values, dtype=np.float64).mean(axis=1)
    return {
        "per_run": [float(v) for v in per_run],
        "run_spread": float(per_run.max() - per_run.min()),
    }
