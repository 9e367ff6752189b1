"""The hierarchical bootstrap and paired statistics on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_ros.evaluation import stats


def balanced(tasks: int, episodes: int) -> np.ndarray:
    return np.repeat(np.arange(tasks), episodes)


def test_each_resample_draws_whole_tasks_then_their_episodes():
    clusters = np.array([0, 0, 1, 1, 1, 2, 3, 3])  # unbalanced: 2, 3, 1, 2 episodes
    weights = stats.bootstrap_weights(clusters, 300, seed=0)
    assert weights.shape == (300, 8)
    sizes = np.bincount(clusters)
    for row in weights:
        # a task drawn k times contributes k * (its size) episode draws
        per_task = np.bincount(clusters, weights=row)
        times_drawn = per_task / sizes
        assert np.allclose(times_drawn, np.round(times_drawn))
        assert times_drawn.sum() == pytest.approx(4)  # as many tasks as there are
    assert np.array_equal(weights, stats.bootstrap_weights(clusters, 300, seed=0))
    assert not np.array_equal(weights, stats.bootstrap_weights(clusters, 300, seed=1))


def test_task_effects_alone_give_the_bootstrap_of_task_means():
    # episodes of a task are identical: the variance of the resampled mean is that of a
    # bootstrap over the T task means, sigma_pop^2 / T, exactly in expectation
    rng = np.random.default_rng(0)
    tasks, episodes = 25, 3
    task_mean = rng.normal(0.0, 2.0, tasks)
    values = np.repeat(task_mean, episodes)
    means = stats.resampled_means(values, stats.bootstrap_weights(balanced(tasks, episodes),
                                                                  8000, seed=1))
    expected = task_mean.std() / np.sqrt(tasks)
    assert means.std() == pytest.approx(expected, rel=0.05)
    assert means.mean() == pytest.approx(values.mean(), abs=0.05 * expected)


def test_episode_noise_alone_gives_the_within_task_variance():
    # every task has mean 0; within a task, E episodes with population variance s_j^2.
    # Resampled mean = mean over T drawn tasks of the mean of E drawn episodes:
    # variance = (1/T) * mean_j(s_j^2) / E
    rng = np.random.default_rng(2)
    tasks, episodes = 20, 4
    values = rng.normal(0.0, 1.0, (tasks, episodes))
    values -= values.mean(axis=1, keepdims=True)
    means = stats.resampled_means(values.ravel(), stats.bootstrap_weights(
        balanced(tasks, episodes), 8000, seed=3))
    expected = np.sqrt(values.var(axis=1).mean() / episodes / tasks)
    assert means.std() == pytest.approx(expected, rel=0.05)


def test_the_interval_covers_the_true_mean_and_an_episode_bootstrap_does_not():
    # a hierarchical population: task effects (sd 1) dominate episode noise (sd 0.3); with
    # many episodes per task an interval that resamples episodes only is far too narrow
    rng = np.random.default_rng(4)
    tasks, episodes, repeats = 10, 6, 150
    clusters = balanced(tasks, episodes)
    hierarchical = stats.bootstrap_weights(clusters, 1000, seed=5)
    flat = stats.bootstrap_weights(np.arange(tasks * episodes), 1000, seed=5)
    covered = {"hierarchical": 0, "episodes": 0}
    for _ in range(repeats):
        values = np.repeat(rng.normal(0.0, 1.0, tasks), episodes)
        values += rng.normal(0.0, 0.3, tasks * episodes)  # true mean 0
        for name, weights in (("hierarchical", hierarchical), ("episodes", flat)):
            estimate = stats.mean_estimate(values, weights)
            covered[name] += estimate.low <= 0.0 <= estimate.high
    # percentile intervals with 10 tasks run a little short of 95 %
    assert 0.84 <= covered["hierarchical"] / repeats <= 0.99, covered
    assert covered["episodes"] / repeats < 0.7, covered


def test_paired_differences_remove_what_methods_share():
    rng = np.random.default_rng(6)
    clusters = balanced(12, 2)
    weights = stats.bootstrap_weights(clusters, 2000, seed=7)
    hardness = np.repeat(rng.lognormal(1.0, 1.0, 12), 2)  # tasks differ a lot, for everyone
    a, b = hardness + 0.5, hardness  # a is worse by exactly 0.5 on every episode
    difference = stats.paired_difference(a, b, weights)
    assert (difference.value, difference.low, difference.high) == pytest.approx((0.5,) * 3)
    unpaired = stats.mean_estimate(a, weights)
    assert unpaired.high - unpaired.low > 1.0  # each alone is uncertain


def test_ratio_of_means_is_exact_when_proportional():
    rng = np.random.default_rng(8)
    weights = stats.bootstrap_weights(balanced(8, 3), 500, seed=9)
    den = rng.uniform(1.0, 2.0, 24)
    estimate = stats.ratio_estimate(0.25 * den, den, weights)
    assert (estimate.value, estimate.low, estimate.high) == pytest.approx((0.25,) * 3)


def test_median_with_never():
    values = np.array([0.1, 0.2, 0.3, np.inf, np.inf])
    weights = stats.bootstrap_weights(np.arange(5), 1000, seed=0)
    estimate = stats.median_estimate(values, weights)
    assert estimate.value == 0.3 and estimate.low <= 0.3 and estimate.high == np.inf
    assert stats.median_estimate(np.array([1.0, 2.0, 3.0, 4.0]), weights[:, :4]).value == 3.0


def test_runs_are_averaged_and_their_spread_reported():
    values = np.array([[1.0, 3.0], [2.0, 4.0], [3.0, 5.0]])  # 3 training runs, 2 episodes
    assert stats.across_runs(values) == {"per_run": [2.0, 3.0, 4.0], "run_spread": 2.0}


def test_cluster_ids_follow_first_appearance():
    assert stats.cluster_ids(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]
