"""The evaluation metrics on synthetic traces with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metarl_ros.evaluation import metrics, stats
from metarl_ros.evaluation.metrics import (
    Traces,
    action_oscillation,
    episode_metrics,
    gap_closed,
    recovery_times,
    rolling_mean,
    second_difference_amplitude,
)

DT = 0.01
WIDTH = 25  # 0.25 s rolling window at 100 Hz
STEPS, FAULT = 400, 200


def trace(error: np.ndarray) -> Traces:
    error = np.atleast_2d(error)
    zeros = np.zeros_like(error)
    return Traces(error, zeros, zeros, zeros)


def test_rolling_mean_matches_a_naive_trailing_mean():
    x = np.random.default_rng(0).normal(size=(3, 57))
    for width in (1, 3, 17, 80):
        naive = np.stack([x[..., max(0, t - width + 1): t + 1].mean(-1) for t in range(57)], -1)
        np.testing.assert_allclose(rolling_mean(x, width), naive, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rolling_mean(np.array([2.0, 4.0, 6.0, 8.0]), 2),
                               [2.0, 3.0, 5.0, 7.0])


def test_a_method_that_returns_to_its_pre_fault_error_recovers():
    error = np.full(STEPS, 0.002)
    error[FAULT : FAULT + 50] = 0.05  # 0.5 s of large error after the fault, then as before
    times = recovery_times(error[None], [FAULT], DT)
    # the trailing 0.25 s RMS holds a bad step until WIDTH - 1 steps after the last one; below
    # 2x the pre-fault RMS it needs the bad steps' share of the window small enough
    rolled = metrics.rolling_rms(error, DT)
    first_ok = FAULT + np.flatnonzero(rolled[FAULT:] > 2 * 0.002)[-1] + 1
    assert times[0] == pytest.approx((first_ok - FAULT) * DT)
    assert 0.5 <= times[0] <= 0.5 + WIDTH * DT


def test_an_error_that_stays_high_never_recovers():
    error = np.full(STEPS, 0.002)
    error[FAULT:] = 0.06  # 30x the pre-fault error: the old metric read 0.00 s here
    assert recovery_times(error[None], [FAULT], DT)[0] == math.inf
    result = episode_metrics(trace(error), [FAULT], DT, None)
    assert result["recovery_time_s"][0] == math.inf
    assert result["post_rms_mrad"][0] == pytest.approx(60.0)
    assert result["pre_rms_mrad"][0] == pytest.approx(2.0)
    assert result["peak_mrad"][0] == pytest.approx(60.0)


def test_no_effect_of_the_fault_is_recovery_at_zero():
    error = np.full(STEPS, 0.002)
    assert recovery_times(error[None], [FAULT], DT)[0] == 0.0


def test_recovering_only_in_the_last_window_counts_as_never():
    error = np.full(STEPS, 0.002)
    error[FAULT: STEPS - 10] = 0.05  # good again for the last 10 steps only (< one window)
    assert recovery_times(error[None], [FAULT], DT)[0] == math.inf


def test_the_ceiling_bound_applies_at_the_same_instant():
    ceiling = np.full(STEPS, 0.001)
    method = np.full(STEPS, 0.003)
    method[:FAULT] = 0.002  # post-fault 1.5x its pre-fault error: within 2x of its own
    # alone, it has recovered at once; against a ceiling at 1 mrad (1.5x = 1.5 mrad) never
    assert recovery_times(method[None], [FAULT], DT)[0] == 0.0
    assert recovery_times(method[None], [FAULT], DT, ceiling[None])[0] == math.inf
    # the ceiling's own error is high for a while after the fault: the bound follows it
    ceiling[FAULT : FAULT + 100] = 0.01
    method[FAULT : FAULT + 100] = 0.012  # tracks 1.2x the ceiling, then stays 3 mrad (bad)
    time = recovery_times(method[None], [FAULT], DT, ceiling[None])[0]
    assert time == math.inf
    method[FAULT + 100 :] = 0.0014  # ... or returns below both bounds
    time = recovery_times(method[None], [FAULT], DT, ceiling[None])[0]
    assert 0.0 < time <= (100 + WIDTH) * DT


def test_recovery_per_episode_fault_steps():
    error = np.full((2, STEPS), 0.002)
    error[0, 100:150] = 0.05
    error[1, 300:] = 0.05
    times = recovery_times(error, [100, 300], DT)
    assert 0.5 <= times[0] <= 0.5 + WIDTH * DT and times[1] == math.inf


def test_oscillation_is_the_amplitude_of_a_step_to_step_alternation():
    steps = np.arange(40)
    alternating = 0.3 * (-1.0) ** steps
    ramp = np.linspace(-1.0, 1.0, 40)
    x = np.stack([alternating, ramp], -1)[None]  # (1, 40, 2)
    amplitude = second_difference_amplitude(x)
    assert amplitude.shape == (1, 40) and amplitude[0, :2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(amplitude[0, 2:], 0.15)  # mean of 0.3 and 0 over the joints
    np.testing.assert_allclose(action_oscillation(x), [0.15])


def test_effort_metrics_in_newton_metres():
    error = np.full((1, STEPS), 0.001)
    effort_sq = np.full((1, STEPS), 4.0)
    effort_sq[0, FAULT:] = 9.0  # RMS 3 N*m after the fault
    osc = np.zeros((1, STEPS))
    osc[0, FAULT:] = 0.5
    result = episode_metrics(Traces(error, effort_sq, osc, osc), [FAULT], DT, None)
    assert result["effort_rms_nm"][0] == pytest.approx(3.0)
    assert result["oscillation_nm"][0] == pytest.approx(0.5)


def weights(n: int) -> np.ndarray:
    return stats.bootstrap_weights(np.arange(n), 500, 0)


def test_gap_closed_in_log_error():
    rng = np.random.default_rng(0)
    n = 20
    log_nominal = np.log(10.0) + rng.normal(0, 0.05, n)
    log_ceiling = log_nominal - np.log(10.0)  # the ceiling is 10x better on every episode
    halfway = log_nominal - 0.5 * np.log(10.0)  # sqrt(10)x better: half the log gap
    score = gap_closed(halfway, log_nominal, log_ceiling, weights(n))
    assert score["value"] == pytest.approx(0.5) and score["ci95"] == pytest.approx([0.5, 0.5])
    assert gap_closed(log_nominal, log_nominal, log_ceiling, weights(n))["value"] == 0.0
    assert gap_closed(log_ceiling, log_nominal, log_ceiling, weights(n))["value"] == 1.0
    worse = gap_closed(log_nominal + np.log(2), log_nominal, log_ceiling, weights(n))
    assert worse["value"] == pytest.approx(-np.log(2) / np.log(10))  # worse than nominal < 0


def test_gap_closed_is_undefined_without_headroom_or_ceiling():
    rng = np.random.default_rng(1)
    log_nominal = np.log(5.0) + rng.normal(0, 0.2, 20)
    level = log_nominal + rng.normal(0, 0.2, 20)  # the "ceiling" is no better than nominal
    result = gap_closed(log_nominal - 0.1, log_nominal, level, weights(20))
    assert result["value"] is None and "headroom within noise" in result["reason"]
    slight = log_nominal - np.log(1.05)  # 5 % better on every episode: real but below 10 %
    assert gap_closed(log_nominal, log_nominal, slight, weights(20))["value"] is None
    assert gap_closed(log_nominal, log_nominal, None, weights(20)) == {
        "value": None, "ci95": None, "reason": "no ceiling run"}


def test_summary_reports_never_and_the_fraction_recovered():
    error = np.full((4, STEPS), 0.002)
    error[:2, FAULT:] = 0.05  # two never recover
    error[2, FAULT : FAULT + 30] = 0.05  # one recovers
    per_episode = episode_metrics(trace(error), [FAULT] * 4, DT, None)
    summary = metrics.summarize_method([per_episode], weights(4), has_ceiling=False)
    recovery = summary["recovery"]
    assert recovery["recovered_fraction"]["mean"] == 0.5
    assert recovery["median_s"] == "never"  # the upper middle of (0, t, never, never)
    assert recovery["mean_s_of_recovered"] == pytest.approx(per_episode["recovery_time_s"][2] / 2)
    assert "no ceiling run" in recovery["bound"]


@pytest.mark.parametrize("env_file", ["iiwa7_tracking.yaml", "iiwa7_compliant.yaml"])
def test_the_effort_is_the_laws_command_read_back_from_the_observation(env_file):
    from metarl_ros.control.law import effort_command
    from metarl_ros.core.resources import share_directory
    from metarl_ros.evaluation.runner import commanded_effort
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.env_config import load_env_setup

    path = share_directory() / "sim/envs" / env_file
    if not path.is_file():
        pytest.skip(f"no {env_file}")
    setup = load_env_setup(path)
    env = ArmTrackingEnv(setup)
    rng = np.random.default_rng(0)
    try:
        obs, _ = env.reset(seed=3)
        observations, actions, expected = [], [], []
        for _ in range(20):
            action = rng.uniform(-1.2, 1.2, setup.act_dim).astype(np.float32)  # some clipped
            reading = env._measured  # what the env computes the effort from
            expected.append(effort_command(setup.law, np.clip(action, -1.0, 1.0),
                                           reading.position, reading.velocity,
                                           env._reference_now))
            observations.append(obs)
            actions.append(action)
            obs, *_ = env.step(action)
    finally:
        env.close()
    effort = commanded_effort(setup, np.stack(observations)[None], np.stack(actions)[None])
    np.testing.assert_allclose(effort[0], np.stack(expected), rtol=1e-4, atol=1e-3)
