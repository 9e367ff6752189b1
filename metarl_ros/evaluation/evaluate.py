"""``metarl eval``: methods on fault suites (or a split), in physical units, with intervals.

What is evaluated (each episode starts on the intact robot; its task strikes mid-episode;
every method runs the same episodes):

* ``--suite NAME|all`` -- the shipped fault suites (``sim/suites/*.yaml``, one per family plus
  the combined mix; :mod:`metarl_ros.sim.suites`), on ``--draw validation`` (default: the draw
  every choice is made on), ``report`` (the published numbers; no choice looks at it) or
  ``both``;
* ``--tasks FILE`` -- a suite file of one's own, same schema, same output;
* ``--split train|heldout|ood`` -- a split of the training task file, ``--episodes`` episodes
  from ``--seed`` (the earlier protocol, now with the metrics below).

Methods (:mod:`metarl_ros.evaluation.methods`): the learned ones from each ``--model``
training run (several runs = several seeds of the same recipes) and any registered policy.
Episodes run in chunks on ``--workers`` processes (:mod:`metarl_ros.evaluation.parallel`);
the JSON does not depend on the number of workers. Metrics: :mod:`~metarl_ros.evaluation.
metrics`; intervals: :mod:`~metarl_ros.evaluation.stats`; JSON layout, table and plots:
:mod:`~metarl_ros.evaluation.report`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from metarl_ros.core.files import atomic_write_json
from metarl_ros.evaluation import metrics, report, stats
from metarl_ros.evaluation.compliance import method_compliance
from metarl_ros.evaluation.methods import (
    METHODS,
    LearnedMethod,
    MethodSpec,
    ModelRun,
    check_first_run,
    find_model_runs,
    resolve_methods,
)
from metarl_ros.evaluation.metrics import Traces, action_oscillation, rolling_mean  # noqa: F401
from metarl_ros.evaluation.parallel import Backend, run_episodes
from metarl_ros.evaluation.runner import (  # noqa: F401  (the in-process API, re-exported)
    MethodRun,
    context_window,
    load_method_models,
    make_jobs,
    post_per_episode,
    run_job,
    run_method,
)
from metarl_ros.learning.checkpoint import CheckpointError, load_model_payload, model_env_config
from metarl_ros.learning.rollout import fault_steps_of  # noqa: F401
from metarl_ros.sim.env_config import EnvSetup, load_env_setup
from metarl_ros.sim.suites import (
    DRAW_NAMES,
    DrawnSuite,
    draw_suite,
    find_suite,
    load_suite,
    shipped_suites,
)
from metarl_ros.sim.tasks import fault_episodes, make_split

AROUND_FAULT_BEFORE_S = 0.5
ComplianceHook = Callable[[MethodSpec, dict, EnvSetup], dict]
COMPLIANCE_HOOK: ComplianceHook | None = method_compliance
"""The push test's hook: ``hook(method spec, {model name: model.pt path} of the first run,
setup) -> JSON-able dict`` (peak flange deflection, mm, and stiffness, N/mm:
:func:`metarl_ros.evaluation.compliance.method_compliance`). Reported under ``compliance``
per method; ``None`` reports "not measured"."""


def split_set(setup: EnvSetup, split: str, episodes: int, seed: int) -> DrawnSuite:
    """A split of the env's task file as a one-condition suite draw (draw ``seed<N>``)."""
    tasks = make_split(setup.tasks, split, setup.robot.friction_scale)  # type: ignore[arg-type]
    distribution = setup.tasks.splits[split].distribution  # type: ignore[index]
    return DrawnSuite(
        suite=f"split_{split}", family="split", draw=f"seed{seed}",
        conditions={distribution: "in_range" if split != "ood" else "beyond"},
        repeating=frozenset(), tasks=tasks, task_condition=[distribution] * len(tasks),
        episodes=fault_episodes(setup.tasks, tasks, episodes, seed),
    )


def suite_sets(
    setup: EnvSetup, names: Sequence[str | Path], draws: Sequence[str],
    tasks_per_condition: int | None = None,
) -> list[DrawnSuite]:
    """Every draw of every suite (names of shipped suites, or suite files)."""
    suites = [load_suite(n if Path(n).suffix in (".yaml", ".yml") else find_suite(str(n)))
              for n in names]
    return [draw_suite(s, d, setup.robot.friction_scale, tasks_per_condition)  # type: ignore
            for d in draws for s in suites]


def _check_labels(runs: Sequence[ModelRun]) -> None:
    for run in runs:
        for name, path in run.models.items():
            stored = load_model_payload(path)["metadata"].get("method", "unknown")
            if stored != name:
                raise CheckpointError(f"{path}: holds a {stored!r} model, expected {name!r}")


def _job_order(spec: MethodSpec) -> int:
    """Slowest first, for a balanced finish: MAML methods adapt online."""
    return 0 if isinstance(spec, LearnedMethod) and spec.maml else 1


def evaluate_sets(
    sets: Sequence[DrawnSuite],
    runs: Sequence[ModelRun],
    methods: Sequence[str],
    env_config: Path,
    workers: int = 1,
    steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    backend: str | Backend = "process",
) -> tuple[dict[tuple[str, int], Traces], dict[str, float]]:
    """Every method (and training run) on every episode of ``sets``: ``traces[(method,
    run)]`` over the episodes of all sets in order, and busy seconds per method; ``backend``
    of :func:`~metarl_ros.evaluation.parallel.run_episodes` (the Ray one: ``metarl eval
    --address``)."""
    episodes = [e for s in sets for e in s.episodes]
    keyed: list[tuple[tuple[str, int], object]] = []
    for name in sorted(methods, key=lambda m: _job_order(METHODS[m])):
        spec = METHODS[name]
        providers = [r for r in runs if r.provides(spec)] if spec.models() else runs[:1]
        for run in providers:
            for job in make_jobs(spec, run.index, run.models, env_config, episodes, steps):
                keyed.append(((name, run.index), job))
    results = run_episodes(run_job, [job for _, job in keyed], workers, progress, backend)
    parts: dict[tuple[str, int], list] = {}
    seconds: dict[str, float] = {}
    for (key, _), result in zip(keyed, results):
        parts.setdefault(key, []).append(result.traces)
        seconds[key[0]] = seconds.get(key[0], 0.0) + result.seconds
    return {k: Traces.concatenate(v) for k, v in parts.items()}, seconds


def summarize(
    sets: Sequence[DrawnSuite],
    traces: dict[tuple[str, int], Traces],
    methods: Sequence[str],
    dt: float,
    seed: int,
    resamples: int = stats.RESAMPLES,
) -> tuple[dict, dict]:
    """``results[draw][suite]`` (layout: :mod:`~metarl_ros.evaluation.report`) and the
    around-fault curves of the first run of each method, per set and condition."""
    results: dict = {}
    curves: dict = {}
    start = 0
    before = int(round(AROUND_FAULT_BEFORE_S / dt))
    for drawn in sets:
        steps = fault_steps_of(drawn.episodes, dt)
        body = {"family": drawn.family, "conditions": {}}
        curves[(drawn.draw, drawn.suite)] = {}
        for condition, scope in drawn.conditions.items():
            index = [i for i, e in enumerate(drawn.episodes)
                     if drawn.condition_of(e) == condition]
            faults = [steps[i] for i in index]
            rows = [start + i for i in index]
            ceiling = traces.get((metrics.CEILING, 0))
            ceiling = None if ceiling is None else ceiling.select(rows)
            per_method: dict[str, list] = {}
            for (method, _run), trace in traces.items():
                chosen = trace.select(rows)
                per_method.setdefault(method, []).append(
                    metrics.episode_metrics(chosen, faults, dt, ceiling)
                )
                if _run == min(r for m, r in traces if m == method):
                    curves[(drawn.draw, drawn.suite)].setdefault(condition, {})[method] = (
                        report.around_fault(chosen.error, faults, before)
                    )
            per_method = {m: per_method[m] for m in methods if m in per_method}
            keys = [drawn.episodes[i].task.key() for i in index]
            summary = report.summarize_condition(
                per_method, keys, f"{drawn.draw}/{drawn.suite}/{condition}", seed, resamples
            )
            body["conditions"][condition] = {"scope": scope, **summary}
        results.setdefault(drawn.draw, {})[drawn.suite] = body
        start += len(drawn.episodes)
    return results, curves


def evaluate(
    model_root: Path,
    split: str,
    episodes: int,
    seed: int,
    methods: Sequence[str] = ("oracle", "robust", "nominal", "pearl", "maml", "pearl_maml"),
    num_envs: int = 10,
) -> tuple[dict, dict[str, MethodRun], list, EnvSetup]:
    """Learned methods (and ``nominal``) on a split, in this process, for scripts
    (``benchmarks/``): ``(summary, runs, plan, setup)`` with ``runs[m]`` a :class:`MethodRun`
    of the episodes ``plan`` and ``summary[m]`` the mean over episodes of the tracking error
    before and after the fault (rad) and of the post-fault RMS error (mrad)."""
    from metarl_ros.learning.rollout import VectorRollout, mean_before_after

    models = load_method_models(Path(model_root), methods)
    nominal = models[metrics.NOMINAL]
    setup = load_env_setup(model_env_config(nominal.payload, nominal.path))
    plan = split_set(setup, split, episodes, seed).episodes
    rollout = VectorRollout(setup, min(num_envs, episodes))
    names = [m for m in METHODS if m in set(methods) | {metrics.NOMINAL}]
    try:
        runs = {m: run_method(m, models, setup, plan, rollout) for m in names}
    finally:
        rollout.close()
    steps = fault_steps_of(plan, setup.control_dt)
    summary = {}
    for name, run in runs.items():
        before, after = mean_before_after(run.tracking_error, steps)
        post = [1e3 * float((run.tracking_error[i, s:] ** 2).mean()) ** 0.5
                for i, s in enumerate(steps)]
        summary[name] = {"tracking_error_before_mean": float(before.mean()),
                         "tracking_error_after_mean": float(after.mean()),
                         "post_rms_mrad": float(sum(post) / len(post))}
    return summary, runs, plan, setup


def _progress(label: str) -> Callable[[int, int], None]:
    shown = {-1}

    def show(done: int, total: int) -> None:
        tenth = 10 * done // total
        if tenth not in shown:
            shown.add(tenth)
            print(f"  {label}: {done}/{total} jobs", flush=True)

    return show


def evaluate_command(args: argparse.Namespace, backend: str | Backend = "process") -> int:
    clock = {"start": time.perf_counter()}
    runs = find_model_runs(args.model)
    methods = resolve_methods(args.methods.split(",") if args.methods else None)
    check_first_run(runs[0], methods)
    _check_labels(runs)
    nominal = runs[0].models[metrics.NOMINAL]
    env_config = model_env_config(load_model_payload(nominal), nominal)
    setup = load_env_setup(env_config)
    draws = list(DRAW_NAMES) if args.draw == "both" else [args.draw]
    if args.suite or args.tasks:
        if args.suite == "all":
            names: list[str | Path] = list(shipped_suites())
        else:
            names = [args.tasks] if args.tasks else args.suite.split(",")
        sets = suite_sets(setup, names, draws, args.tasks_per_condition)
        source = {"suites": [str(n) for n in names], "draws": draws}
    else:
        if args.episodes < 1:
            raise CheckpointError("--episodes must be >= 1")
        split = args.split or "heldout"
        sets = [split_set(setup, split, args.episodes, args.seed)]
        source = {"split": split, "episodes": args.episodes, "seed": args.seed}
    clock["setup"] = time.perf_counter()
    print(f"evaluating {', '.join(methods)} on {sum(len(s.episodes) for s in sets)} episodes "
          f"({len(sets)} suite draw(s)) with {args.workers} worker(s)", flush=True)
    traces, busy = evaluate_sets(sets, runs, methods, env_config, args.workers,
                                 progress=_progress("episodes"), backend=backend)
    clock["episodes"] = time.perf_counter()
    results, curves = summarize(sets, traces, methods, setup.control_dt, args.seed)
    clock["statistics"] = time.perf_counter()
    compliance = {
        m: COMPLIANCE_HOOK(METHODS[m], runs[0].models, setup) if COMPLIANCE_HOOK
        else {"status": "not measured (no push test wired: evaluate.COMPLIANCE_HOOK)"}
        for m in methods
    }
    protocol = {
        **source,
        "methods": methods,
        "model_runs": [{"index": r.index, "path": str(r.path),
                        "methods": [m for m in methods if METHODS[m].models()
                                    and r.provides(METHODS[m])]} for r in runs],
        "env_config": str(env_config),
        "control_dt": setup.control_dt,
        "episode_s": setup.config.episode_s,
        "metrics": {"rolling_window_s": metrics.ROLLING_WINDOW_S,
                    "recovery_own_pre_fault_factor": metrics.OWN_PRE_FAULT_FACTOR,
                    "recovery_ceiling_factor": metrics.CEILING_FACTOR,
                    "gap_closed_min_headroom_ratio": metrics.MIN_HEADROOM_RATIO,
                    "ceiling": metrics.CEILING if metrics.CEILING in methods else None},
        "bootstrap": {"levels": ["task", "episode"], "resamples": stats.RESAMPLES,
                      "seed": args.seed, "confidence": stats.CONFIDENCE,
                      "training_runs": "averaged per episode; per_run beside"},
    }
    document = {"protocol": protocol, "results": results, "compliance": compliance}
    atomic_write_json(Path(args.json), document, allow_nan=True)
    report.print_table(results, methods)
    print(f"wrote {args.json}")
    if args.plot:
        for path in report.write_plots(Path(args.plot), results, curves, methods,
                                       setup.control_dt, AROUND_FAULT_BEFORE_S):
            print(f"wrote {path}")
    clock["report"] = time.perf_counter()
    _print_timings(clock, busy, args)
    return 0


def _print_timings(clock: dict, busy: dict, args: argparse.Namespace) -> None:
    parts = ("setup", "episodes", "statistics", "report")
    times = [clock[p] - clock[q] for p, q in zip(parts, ("start",) + parts[:-1])]
    timing = {"wall_s": dict(zip(parts, times)), "total_s": clock["report"] - clock["start"],
              "workers": args.workers, "busy_s_per_method": busy}
    print("time: " + ", ".join(f"{p} {t:.1f} s" for p, t in zip(parts, times))
          + f"; total {timing['total_s']:.1f} s with {args.workers} worker(s)")
    print("busy worker time per method: "
          + ", ".join(f"{m} {s:.0f} s" for m, s in sorted(busy.items(), key=lambda x: -x[1])))
    if args.timings:
        atomic_write_json(Path(args.timings), timing)
