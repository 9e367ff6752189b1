"""The results of ``metarl eval``: per-condition summaries (JSON), the table and the plots.

JSON layout (``--json``)::

    {"protocol": {...what was run: methods, runs, draws, suites, metric definitions...},
     "results": {<draw>: {<suite>: {
         "family",
         "conditions": {<condition>: {
             "scope": "in_range" | "beyond", "tasks", "episodes",
             "headroom": {"ln_nominal_over_ceiling": {"mean", "ci95"}, "clear_of_noise"}
                         | null (no ceiling run),
             "methods": {<method>: {
                 "runs", <metric>: {"mean", "ci95"[, "per_run", "run_spread"]} for
                 post_rms_mrad, peak_mrad, pre_rms_mrad, effort_rms_nm, oscillation_nm,
                 action_oscillation,
                 "recovery": {"recovered_fraction": {"mean", "ci95"}, "median_s",
                              "median_ci95", "mean_s_of_recovered", "bound"},
                 "gap_closed": {"value", "ci95", "reason"}}},
             "paired": [{"a", "b", "post_rms_mrad_diff": {"mean", "ci95"},
                         "post_rms_ratio": {"mean", "ci95"}}, ...]}}}}},
     "compliance": {<method>: {...} | {"status": "not measured ..."}}}

Draws are ``validation`` / ``report`` for suites, ``seed<N>`` for a split. Recovery times
that never happened read ``"never"``.
"""

from __future__ import annotations

import sys
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metarl_ros.evaluation import metrics, stats

PAIRS = (("pearl", "robust"), ("maml", "robust"), ("pearl_maml", "pearl"),
         ("pearl_adapt", "pearl"), ("pearl_adapt", "adaptive_ff"), ("pearl_ahead", "pearl"),
         ("pearl_maml_ahead", "pearl_maml"))
"""Paired differences reported beside every method against nominal and the ceiling: what the
context adds, what the MAML correction and the parameter adaptation add to the same policy,
and what PEARL's prior adds to the parameter adaptation."""


def _mean_over_runs(per_run: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.mean([run[name] for run in per_run], axis=0)


def summarize_condition(
    per_method: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    task_keys: Sequence[str],
    bootstrap_key: str,
    seed: int,
    resamples: int = stats.RESAMPLES,
) -> dict:
    """All methods on one condition: ``per_method[m]`` holds one
    :func:`~metarl_ros.evaluation.metrics.episode_metrics` dict per training run, on the same
    episodes (tasks ``task_keys``). ``bootstrap_key`` (e.g. ``report/payload/in_range``) and
    ``seed`` seed the resamples: a condition's intervals do not depend on what else ran."""
    clusters = stats.cluster_ids(task_keys)
    weights = stats.bootstrap_weights(
        clusters, resamples, [seed, zlib.crc32(bootstrap_key.encode())]
    )
    has_ceiling = metrics.CEILING in per_method
    logs = {m: _mean_over_runs(runs, "log_post_rms") for m, runs in per_method.items()}
    log_ceiling = logs.get(metrics.CEILING)
    out: dict = {"tasks": int(clusters.max()) + 1, "episodes": len(task_keys), "headroom": None}
    if has_ceiling and metrics.NOMINAL in logs:
        room, clear = metrics.headroom(logs[metrics.NOMINAL], log_ceiling, weights)
        out["headroom"] = {"ln_nominal_over_ceiling": room.to_json(), "clear_of_noise": clear}
    out["methods"] = {}
    for method, runs in per_method.items():
        summary = metrics.summarize_method(runs, weights, has_ceiling)
        if metrics.NOMINAL in logs:
            summary["gap_closed"] = metrics.gap_closed(
                logs[method], logs[metrics.NOMINAL], log_ceiling, weights
            )
        out["methods"][method] = summary
    means = {
        m: {k: _mean_over_runs(runs, k) for k in ("post_rms_mrad", "log_post_rms")}
        for m, runs in per_method.items()
    }
    pairs = [(m, ref) for ref in (metrics.NOMINAL, metrics.CEILING) for m in per_method
             if ref in per_method and m != ref and m not in (metrics.NOMINAL, metrics.CEILING)]
    pairs += [p for p in PAIRS if p[0] in per_method and p[1] in per_method]
    out["paired"] = [metrics.paired(a, b, means[a], means[b], weights) for a, b in pairs]
    return out


def _cell(estimate: dict) -> str:
    low, high = estimate["ci95"]
    return f"{estimate['mean']:.1f} [{low:.1f}, {high:.1f}]"


def print_table(results: dict, methods: Sequence[str]) -> None:
    """Post-fault RMS tracking error (mrad, 95 % interval) per draw, suite, condition."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 250)
    for draw, suites in results.items():
        table = Table(title=f"metarl eval, {draw}: post-fault RMS tracking error, mrad [95 %]")
        table.add_column("suite / condition")
        for method in methods:
            table.add_column(method, justify="right")
        for suite, body in suites.items():
            for condition, result in body["conditions"].items():
                row = [f"{suite} / {condition}"]
                for method in methods:
                    entry = result["methods"].get(method)
                    row.append(_cell(entry["post_rms_mrad"]) if entry else "-")
                table.add_row(*row)
        console.print(table)


def _plot_paths(path: Path, draws_suites: Sequence[tuple[str, str]]) -> tuple[dict, dict]:
    """Where each figure goes: ``path`` as a .png names the main figure (the one suite's
    around-fault plot when there is one set, else the summary); otherwise a folder."""
    single = len(draws_suites) == 1
    if path.suffix == ".png":
        stem = path.with_suffix("")
        if single:
            return {}, {draws_suites[0]: path}
        summary = {d: Path(f"{stem}_{d}.png") for d, _ in draws_suites}
        return summary, {(d, s): Path(f"{stem}_{d}_{s}.png") for d, s in draws_suites}
    summary = {d: path / f"summary_{d}.png" for d, _ in draws_suites}
    return ({} if single else summary), {(d, s): path / f"{d}_{s}.png" for d, s in draws_suites}


def write_plots(
    path: Path,
    results: dict,
    curves: Mapping[tuple[str, str], Mapping[str, Mapping[str, np.ndarray]]],
    methods: Sequence[str],
    dt: float,
    before_s: float,
) -> list[Path]:
    """The summary (per draw) and around-fault (per draw and suite) figures; returns paths.

    ``curves[(draw, suite)][condition][method]``: mean error (rad) from ``before_s`` before
    the fault on, one value per step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    summary_paths, fault_paths = _plot_paths(path, list(curves))
    written = []
    for draw, target in summary_paths.items():
        suites = results[draw]
        fig, axes = plt.subplots(1, len(suites), figsize=(3.2 * len(suites) + 1, 4.2),
                                 squeeze=False)
        for ax, (suite, body) in zip(axes[0], suites.items()):
            conditions = list(body["conditions"])
            width = 0.8 / max(1, len(methods))
            for k, method in enumerate(methods):
                rows = [body["conditions"][c]["methods"].get(method) for c in conditions]
                x = [i + (k - len(methods) / 2) * width for i, r in enumerate(rows) if r]
                mean = [r["post_rms_mrad"]["mean"] for r in rows if r]
                low = [r["post_rms_mrad"]["ci95"][0] for r in rows if r]
                high = [r["post_rms_mrad"]["ci95"][1] for r in rows if r]
                err = [np.subtract(mean, low), np.subtract(high, mean)]
                ax.bar(x, mean, width, yerr=err, label=method, align="edge", capsize=1.5)
            ax.set_xticks(range(len(conditions)), conditions, rotation=20, fontsize=8)
            ax.set_yscale("log")
            ax.set_title(suite, fontsize=10)
            ax.grid(alpha=0.3, axis="y", which="both")
        axes[0][0].set_ylabel("post-fault RMS error [mrad]")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{draw}: post-fault RMS tracking error, 95 % intervals over tasks")
        fig.tight_layout()
        written.append(_save(fig, target, plt))
    for (draw, suite), target in fault_paths.items():
        conditions = curves[(draw, suite)]
        fig, axes = plt.subplots(1, len(conditions), figsize=(5 * len(conditions), 4.2),
                                 squeeze=False)
        for ax, (condition, lines) in zip(axes[0], conditions.items()):
            for method in methods:
                if method in lines:
                    curve = lines[method]
                    ax.plot(np.arange(len(curve)) * dt - before_s, 1e3 * curve, label=method)
            ax.axvline(0.0, color="k", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("time since fault [s]")
            ax.set_title(condition)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel("mean tracking error ||q_ref - q|| [mrad]")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{draw}, {suite}: tracking error around the fault")
        fig.tight_layout()
        written.append(_save(fig, target, plt))
    return written


def _save(fig, target: Path, plt) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def around_fault(error: np.ndarray, fault_steps: Sequence[int], before: int) -> np.ndarray:
    """Mean of ``error`` (N, steps) aligned at each episode's fault (index ``before``), from
    ``before`` steps before it to the shortest remaining length; an episode whose fault comes
    earlier counts from its start (NaN where no episode has data)."""
    after = min(error.shape[1] - f for f in fault_steps)
    rows = np.full((len(fault_steps), before + after), np.nan)
    for i, f in enumerate(fault_steps):
        lo = max(0, f - before)
        rows[i, before - (f - lo):] = error[i, lo : f + after]
    with warnings.catch_warnings():  # steps before every episode's start stay NaN (a gap)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(rows, axis=0)
