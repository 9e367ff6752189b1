"""Metrics in physical units, per episode and per suite condition.

Every episode starts on the intact robot; the fault strikes at step ``f``. With ``e_t`` the
tracking error ``||q_ref - q||_2`` of the true state (rad) and ``tau_t`` the commanded joint
effort (N*m, the control law's: PD, action and any feed-forward, before the firmware's gravity
compensation and the motor limits):

* ``post_rms_mrad`` (**primary**): ``sqrt(mean_{t >= f} e_t^2)``, mrad.
* ``peak_mrad``: ``max_{t >= f} e_t``, mrad.
* ``pre_rms_mrad``: the same RMS before the fault (the intact robot), mrad.
* ``effort_rms_nm``: RMS of ``tau`` over joints and post-fault steps, N*m.
* ``oscillation_nm``: post-fault mean over steps and joints of ``|tau_t - 2 tau_{t-1} +
  tau_{t-2}| / 4``, N*m: the amplitude of a step-to-step alternation of the command (``A
  (-1)^t`` gives ``A``; a ramp gives 0) -- what shakes a robot, invisible in the error of a
  stiff simulated arm. ``action_oscillation`` is the same on the normalized action.
* ``recovery_time_s``: the first time after the fault from which the rolling error (trailing
  :data:`ROLLING_WINDOW_S` RMS of ``e``) stays, to the end of the episode, below **both**
  :data:`OWN_PRE_FAULT_FACTOR` x the method's own pre-fault RMS of that episode and
  :data:`CEILING_FACTOR` x the ceiling's rolling error at the same instant on the same
  episode. ``inf`` (reported "never") when it does not, or when the bound holds only within the
  last window of the episode (too late to tell). Without a ceiling run only the first bound
  applies and the result says so.
* **gap closed**: ``(L_nominal - L_method) / (L_nominal - L_ceiling)`` with ``L`` the mean
  over episodes of ``ln(post-fault RMS)`` -- the share of the log-error headroom between the
  nominal policy and the physical ceiling that a method wins. Undefined (``null`` with the
  reason) without a ceiling run or when the headroom is within noise: the lower end of its
  95 % interval is below ``ln`` :data:`MIN_HEADROOM_RATIO` (the ceiling is not, with
  confidence, at least 10 % below nominal).

These replace the normalized return, whose denominator (oracle minus nominal return) went
negative on single-family suites so that a better method scored lower, and the recovery time
against "10 % of the oracle plus 5 mrad", which read 0.00 s where nothing had recovered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from metarl_ros.evaluation import stats

ROLLING_WINDOW_S = 0.25
OWN_PRE_FAULT_FACTOR = 2.0
CEILING_FACTOR = 1.5
MIN_HEADROOM_RATIO = 1.1
NOMINAL = "nominal"
CEILING = "ceiling"


@dataclass
class Traces:
    """Per-step signals of N episodes of one method run; every array (N, steps)."""

    error: np.ndarray
    """rad, ``||q_ref - q||`` of the true state."""
    effort_sq: np.ndarray
    """N*m^2, mean over joints of the squared effort command."""
    effort_osc: np.ndarray
    """N*m, mean over joints of ``|second difference| / 4`` of the effort (0 for t < 2)."""
    action_osc: np.ndarray
    """The same on the normalized action."""

    @classmethod
    def concatenate(cls, parts: Sequence["Traces"]) -> "Traces":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))

    def select(self, index: np.ndarray) -> "Traces":
        return Traces(*(getattr(self, f)[index] for f in FIELDS))


FIELDS = ("error", "effort_sq", "effort_osc", "action_osc")


def second_difference_amplitude(x: np.ndarray) -> np.ndarray:
    """``|x_t - 2 x_{t-1} + x_{t-2}| / 4`` averaged over the last axis, for ``x`` (..., S, J);
    shape (..., S) with zeros at t = 0, 1."""
    out = np.zeros(x.shape[:-1])
    out[..., 2:] = np.abs(x[..., 2:, :] - 2.0 * x[..., 1:-1, :] + x[..., :-2, :]).mean(-1) / 4.0
    return out


def action_oscillation(action: np.ndarray) -> np.ndarray:
    """Per episode, the mean step-to-step alternation amplitude of ``action`` (episodes,
    steps, act_dim) over all steps and joints; shape (episodes,)."""
    second_difference = action[:, 2:] - 2.0 * action[:, 1:-1] + action[:, :-2]
    return np.abs(second_difference).mean(axis=(1, 2)) / 4.0


def rolling_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over ``width`` steps along the last axis (shorter at the start)."""
    csum = np.cumsum(x, axis=-1)
    out = csum.copy()
    out[..., width:] = csum[..., width:] - csum[..., :-width]
    counts = np.minimum(np.arange(1, x.shape[-1] + 1), width)
    return out / counts


def rolling_rms(error: np.ndarray, dt: float) -> np.ndarray:
    """Trailing :data:`ROLLING_WINDOW_S` RMS of ``error`` (..., steps)."""
    width = max(1, int(round(ROLLING_WINDOW_S / dt)))
    return np.sqrt(np.maximum(rolling_mean(np.asarray(error, np.float64) ** 2, width), 0.0))


def _window_rms(x: np.ndarray, lo: int, hi: int | None = None) -> float:
    return float(np.sqrt(np.mean(np.asarray(x[lo:hi], np.float64) ** 2)))


def recovery_times(
    error: np.ndarray,
    fault_steps: Sequence[int],
    dt: float,
    ceiling_error: np.ndarray | None = None,
) -> np.ndarray:
    """Per episode, seconds from the fault to recovery (definition: module doc), ``inf`` for
    never. ``error`` and ``ceiling_error`` (the ceiling on the same episodes): (N, steps), rad.
    """
    width = max(1, int(round(ROLLING_WINDOW_S / dt)))
    rolled = rolling_rms(error, dt)
    ceiling = None if ceiling_error is None else rolling_rms(ceiling_error, dt)
    times = np.full(len(fault_steps), np.inf)
    for i, fault in enumerate(fault_steps):
        bound = np.full(rolled.shape[1] - fault, OWN_PRE_FAULT_FACTOR * _window_rms(
            error[i], 0, fault))
        if ceiling is not None:
            bound = np.minimum(bound, CEILING_FACTOR * ceiling[i, fault:])
        bad = np.flatnonzero(rolled[i, fault:] > bound)
        last_bad = -1 if bad.size == 0 else int(bad[-1])
        if last_bad < bound.size - width:  # held for at least one window before the end
            times[i] = (last_bad + 1) * dt
    return times


def episode_metrics(
    traces: Traces, fault_steps: Sequence[int], dt: float, ceiling: Traces | None
) -> dict[str, np.ndarray]:
    """Every per-episode metric of the module doc, each (N,)."""
    rows = []
    for i, f in enumerate(fault_steps):
        rows.append((
            1e3 * _window_rms(traces.error[i], f),
            1e3 * float(np.max(traces.error[i, f:])),
            1e3 * _window_rms(traces.error[i], 0, f),
            float(np.sqrt(np.mean(traces.effort_sq[i, f:]))),
            float(np.mean(traces.effort_osc[i, max(f, 2):])),
            float(np.mean(traces.action_osc[i, max(f, 2):])),
        ))
    names = ("post_rms_mrad", "peak_mrad", "pre_rms_mrad", "effort_rms_nm", "oscillation_nm",
             "action_oscillation")
    out = {name: np.array(column) for name, column in zip(names, zip(*rows))}
    out["log_post_rms"] = np.log(np.maximum(out["post_rms_mrad"], 1e-6))
    out["recovery_time_s"] = recovery_times(
        traces.error, fault_steps, dt, None if ceiling is None else ceiling.error
    )
    return out


SUMMARIZED = ("post_rms_mrad", "peak_mrad", "pre_rms_mrad", "effort_rms_nm", "oscillation_nm",
              "action_oscillation")


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "never"


def summarize_method(
    per_run: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray, has_ceiling: bool
) -> dict:
    """One method on one condition: each metric's mean over episodes (averaged over training
    runs) with its hierarchical-bootstrap interval, and the recovery."""
    out: dict = {"runs": len(per_run)}
    for name in SUMMARIZED:
        values = np.stack([run[name] for run in per_run])
        out[name] = stats.mean_estimate(values.mean(axis=0), weights).to_json()
        if len(per_run) > 1:
            out[name].update(stats.across_runs(values))
    times = np.median(np.stack([run["recovery_time_s"] for run in per_run]), axis=0)
    recovered = np.isfinite(times)
    median = stats.median_estimate(times, weights)
    out["recovery"] = {
        "recovered_fraction": stats.mean_estimate(recovered.astype(float), weights).to_json(),
        "median_s": _finite(median.value),
        "median_ci95": [_finite(median.low), _finite(median.high)],
        "mean_s_of_recovered": float(times[recovered].mean()) if recovered.any() else None,
        "bound": (f"min({OWN_PRE_FAULT_FACTOR:g} x own pre-fault RMS, {CEILING_FACTOR:g} x "
                  "ceiling's rolling error)" if has_ceiling else
                  f"{OWN_PRE_FAULT_FACTOR:g} x own pre-fault RMS only: no ceiling run, so the "
                  "ceiling bound is not applied"),
    }
    return out


def headroom(
    log_nominal: np.ndarray, log_ceiling: np.ndarray, weights: np.ndarray
) -> tuple[stats.Estimate, bool]:
    """``mean(ln e_nominal - ln e_ceiling)`` with its interval, and whether it is clear of
    noise (lower end above ``ln`` :data:`MIN_HEADROOM_RATIO`)."""
    estimate = stats.paired_difference(log_nominal, log_ceiling, weights)
    return estimate, bool(estimate.low > math.log(MIN_HEADROOM_RATIO))


def gap_closed(
    log_method: np.ndarray,
    log_nominal: np.ndarray,
    log_ceiling: np.ndarray | None,
    weights: np.ndarray,
) -> dict:
    """The gap-closed score of one method (definition: module doc), JSON-ready."""
    if log_ceiling is None:
        return {"value": None, "ci95": None, "reason": "no ceiling run"}
    room, clear = headroom(log_nominal, log_ceiling, weights)
    if not clear:
        return {"value": None, "ci95": None,
                "reason": f"headroom within noise: ln(e_nominal / e_ceiling) = {room.value:.3f}"
                          f" [{room.low:.3f}, {room.high:.3f}], needs > "
                          f"ln({MIN_HEADROOM_RATIO:g})"}
    score = stats.ratio_estimate(log_nominal - log_method, log_nominal - log_ceiling, weights)
    return {"value": score.value, "ci95": [score.low, score.high], "reason": None}


def paired(
    name_a: str,
    name_b: str,
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    weights: np.ndarray,
) -> dict:
    """``a - b`` on the same episodes: post-fault RMS (mrad) and its log ratio."""
    diff = stats.paired_difference(a["post_rms_mrad"], b["post_rms_mrad"], weights)
    log = stats.paired_difference(a["log_post_rms"], b["log_post_rms"], weights)
    return {
        "a": name_a,
        "b": name_b,
        "post_rms_mrad_diff": diff.to_json(),
        "post_rms_ratio": {"mean": math.exp(log.value),
                           "ci95": [math.exp(log.low), math.exp(log.high)]},
    }
