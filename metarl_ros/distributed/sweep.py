"""``metarl sweep``: one Ray Tune trial per combination of seeds and ``--set`` values.

Each trial is a ``metarl train`` run: the config with the trial's overrides
(``seed=S``, then each ``--set key=value``, through
:func:`~metarl_ros.learning.config.load_train_config`), trained by
:class:`~metarl_ros.learning.trainer.Trainer` into its own run directory with the same
checkpoints, TensorBoard logs, ``config.yaml`` and ``model.pt``; it resumes that directory's
latest checkpoint if there is one. A trial asks Ray for ``torch_threads`` CPUs and reports
every iteration's statistics to Tune.

``--out`` holds::

    sweep.json             what the sweep is: config, seeds, --set values, each trial's config
    runs/<trial>/          each trial's run directory (as ``metarl train --out``), and its
                           final.json once it has trained to the end
    tune/                  Ray Tune's experiment state
    results.json, .csv     the table: final metrics per trial

``--resume`` after the driver was killed restores Tune's experiment (``Tuner.restore``): trials
Tune saw finish are not started again, the others start again and each continues from its
own latest training checkpoint; a trial whose run directory already has ``final.json`` (it
finished after Tune last saved its state) reports that file and trains nothing.

On a cluster (``--address``) every node must see ``--out`` and the config at the same paths
(a shared file system) and have the same package installed (docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarl_ros.core.errors import MetarlError
from metarl_ros.core.files import atomic_write_json, atomic_write_text
from metarl_ros.distributed.runtime import import_tune, ray_session

FEATURE = "metarl sweep"
RUNS = "runs"
TUNE_DIR = "tune"
SPEC_FILE = "sweep.json"
FINAL_FILE = "final.json"
TABLE_METRICS = (
    "eval/return",
    "eval/tracking_error_before",
    "eval/tracking_error_after",
    "train/return",
)
"""Columns of the results table (besides counters); every final metric is in results.json."""


# ------------------------------------------------------------------------------ the grid


def split_values(text: str) -> list[str]:
    """The values of one ``--set key=v1,v2``: ``"0.001,0.01"`` -> ``["0.001", "0.01"]``.

    Commas inside brackets, braces or quotes do not split (``[64,64],[128,128]`` is two list
    values). Each value stays text: :func:`~metarl_ros.learning.config.apply_overrides`
    parses it, as for ``metarl train --set``."""
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_set(item: str) -> tuple[str, tuple[str, ...]]:
    """``"agent.kl_weight=0.001,0.01"`` -> ``("agent.kl_weight", ("0.001", "0.01"))``."""
    key, sep, text = item.partition("=")
    values = split_values(text)
    if not sep or not key.strip() or not all(values):
        raise MetarlError(f"--set {item!r}: expected dotted.key=value[,value...]")
    return key.strip(), tuple(values)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise MetarlError(f"--seeds {text!r}: expected comma-separated integers") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise MetarlError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds


def trial_name(overrides: Sequence[str]) -> str:
    """A trial's directory name: its overrides, characters unsafe in paths replaced."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(overrides)) or "config"


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: the training config, the seeds and the ``--set`` values; a trial per
    combination, seeds varying fastest."""

    config: str
    """absolute path of the training YAML."""
    seeds: tuple[int, ...] = ()
    """empty: the config's own seed."""
    sets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    cwd: str = field(default_factory=os.getcwd)
    """where relative paths in the config and in ``--set`` values are looked up."""

    def trials(self) -> dict[str, tuple[str, ...]]:
        """Trial name -> its overrides, in sweep order."""
        keys = [key for key, _ in self.sets]
        seeds = [f"seed={s}" for s in self.seeds] or [None]
        out: dict[str, tuple[str, ...]] = {}
        for values in itertools.product(*(values for _, values in self.sets)):
            for seed in seeds:
                overrides = ([seed] if seed else []) + [f"{k}={v}" for k, v in zip(keys, values)]
                name = trial_name(overrides)
                if name in out:  # two values that differ only in unsafe characters
                    name = f"{len(out):03d}_{name}"
                out[name] = tuple(overrides)
        return out

    def describe(self) -> dict:
        return {"config": self.config, "seeds": list(self.seeds),
                "set": [[key, list(values)] for key, values in self.sets]}


def trial_configs(spec: SweepSpec) -> dict[str, Any]:
    """Every trial's validated :class:`~metarl_ros.learning.config.TrainConfig` (so that a bad
    ``--set`` fails here, before Ray starts)."""
    from metarl_ros.learning.config import load_train_config

    cwd = os.getcwd()
    os.chdir(spec.cwd)
    try:
        return {name: load_train_config(spec.config, overrides)
                for name, overrides in spec.trials().items()}
    finally:
        os.chdir(cwd)


def _check_same_sweep(path: Path, spec: SweepSpec, configs: dict[str, Any]) -> None:
    from metarl_ros.learning.config import config_changes

    stored = json.loads(path.read_text())
    if stored["sweep"] != spec.describe():
        raise MetarlError(
            f"{path}: the sweep there is {stored['sweep']}, not {spec.describe()}; resume "
            "with the same --config, --seeds and --set, or choose another --out"
        )
    for name, config in configs.items():
        changes = config_changes(stored["trials"].get(name, {}), config)
        if changes:
            raise MetarlError(
                f"{path}: trial {name} was started with a different config "
                f"({'; '.join(changes)}); restore the config file or choose another --out"
            )


# ------------------------------------------------------------------------------ one trial


def train_run(
    config_path: Path,
    overrides: Sequence[str],
    run_dir: Path,
    report: Callable[[dict[str, float]], None] | None = None,
) -> dict:
    """Train one run as ``metarl train --config config_path --set ... --out run_dir --resume``
    does and return its final record (also written to ``run_dir/final.json``): counters,
    wall and CPU seconds of this (re)start's training, and the last iteration's statistics.
    ``report`` gets every iteration's statistics with the counters. A run directory that has
    ``final.json`` is not trained again: its record is returned."""
    final_file = run_dir / FINAL_FILE
    if final_file.is_file():
        print(f"{run_dir}: trained to the end before; not trained again", flush=True)
        return json.loads(final_file.read_text())
    from metarl_ros.learning.config import load_train_config, run_config_text
    from metarl_ros.learning.trainer import Trainer

    config = load_train_config(config_path, overrides)
    trainer = Trainer(config, run_dir, config_path=config_path, progress=False)

    def counters() -> dict[str, float]:
        return {"iteration": trainer.iteration, "env_steps": trainer.env_steps,
                "updates": trainer.updates}

    try:
        if trainer.resume():
            print(f"resumed {run_dir} at iteration {trainer.iteration} "
                  f"({trainer.env_steps} env steps, {trainer.updates} updates)", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", run_config_text(config_path, overrides))
        start, cpu = time.monotonic(), time.process_time()
        stats = trainer.run(
            on_iteration=None if report is None else lambda s: report({**counters(), **s})
        )
        if "eval/return" not in stats:  # resumed at the end: evaluate the final agent again
            stats = {**stats, **trainer.evaluate()}
        record = {**counters(), "train_seconds": time.monotonic() - start,
                  "train_cpu_seconds": time.process_time() - cpu,
                  "overrides": list(overrides), "metrics": stats}
    finally:
        trainer.rollout.close()
        trainer.eval_rollout.close()
    atomic_write_json(final_file, record, allow_nan=True)
    return record


def train_trial(params: dict, sweep: dict) -> None:
    """The Tune trainable: trial ``params["trial"]`` of the sweep ``sweep`` (see
    :func:`run_sweep`), trained by :func:`train_run`, every iteration reported to Tune."""
    from ray import tune

    name = params["trial"]
    if os.path.isdir(sweep["cwd"]):  # Tune starts trials in a directory of its own
        os.chdir(sweep["cwd"])
    reported = []

    def report(metrics: dict[str, float]) -> None:
        reported.append(True)
        tune.report(metrics)

    record = train_run(Path(sweep["config"]), sweep["trials"][name],
                       Path(sweep["out"]) / RUNS / name, report)
    if not reported:  # nothing trained in this attempt: its result is the stored one
        tune.report({key: record[key] for key in ("iteration", "env_steps", "updates")}
                    | record["metrics"])


# ------------------------------------------------------------------------------ the sweep


def _progress_callback(tune: Any) -> Any:
    """A Tune callback that prints one line when a trial starts, ends or fails."""

    class Lines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"sweep: trial {trial.config['trial']} started", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            print(f"sweep: trial {trial.config['trial']} finished at iteration "
                  f"{result.get('iteration', '?')}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"sweep: trial {trial.config['trial']} failed", flush=True)

    return Lines()


def run_sweep(
    spec: SweepSpec,
    out: Path,
    resume: bool = False,
    address: str | None = None,
) -> list[dict]:
    """Run (or with ``resume`` continue) the sweep ``spec`` into ``out``; returns the
    results table's rows (also written to ``out/results.json`` and ``.csv``)."""
    tune = import_tune(FEATURE)
    out = out.resolve()
    configs = trial_configs(spec)
    spec_file = out / SPEC_FILE
    if spec_file.is_file():
        if not resume:
            raise MetarlError(f"{out} already holds a sweep; pass --resume to continue it or "
                              "choose another --out")
        _check_same_sweep(spec_file, spec, configs)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec_file, {
            "sweep": spec.describe(),
            "trials": {name: c.model_dump(mode="json") for name, c in configs.items()},
        })
    sweep = {"config": spec.config, "cwd": spec.cwd, "out": str(out),
             "trials": {name: list(o) for name, o in spec.trials().items()}}
    threads = {name: config.torch_threads for name, config in configs.items()}
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, sweep=sweep),
        lambda params: tune.PlacementGroupFactory([{"CPU": threads[params["trial"]]}]),
    )
    experiment = out / TUNE_DIR
    with ray_session(FEATURE, address=address):
        if resume and tune.Tuner.can_restore(str(experiment)):
            print(f"sweep: resuming {experiment}", flush=True)
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(list(configs))},
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=str(out), verbose=0,
                    callbacks=[_progress_callback(tune)],
                ),
            )
        grid = tuner.fit()
        errors = {r.config["trial"]: r.error for r in grid if r.config and r.error}
    rows = results_rows(spec, out, errors)
    write_results(out, rows)
    return rows


def results_rows(spec: SweepSpec, out: Path, errors: dict[str, Any]) -> list[dict]:
    """One row per trial: its overrides, status, counters and final metrics."""
    rows = []
    for name, overrides in spec.trials().items():
        row: dict[str, Any] = {"trial": name}
        row.update(dict(item.split("=", 1) for item in overrides))
        final_file = out / RUNS / name / FINAL_FILE
        if final_file.is_file():
            record = json.loads(final_file.read_text())
            row.update(status="done", iteration=record["iteration"],
                       env_steps=record["env_steps"],
                       minutes=record["train_seconds"] / 60.0, **record["metrics"])
        else:
            error = errors.get(name)
            row["status"] = f"error: {str(error).splitlines()[0]}" if error else "unfinished"
        row["run"] = str(out / RUNS / name)
        rows.append(row)
    return rows


def write_results(out: Path, rows: list[dict]) -> None:
    atomic_write_json(out / "results.json", rows, allow_nan=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    stream = io.StringIO()
    writer = csv.DictWriter(stream, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", stream.getvalue())


def print_results(rows: list[dict], keys: Sequence[str]) -> None:
    """The results table on the console: the varied ``keys``, status and final metrics."""
    from rich.console import Console
    from rich.table import Table

    columns = (*keys, "status", "iteration", "minutes", *TABLE_METRICS)
    table = Table(title="metarl sweep")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(
            f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
            for k in columns
        ))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def sweep_command(args: argparse.Namespace) -> int:
    from metarl_ros.core.resources import resolve_path

    config = resolve_path(args.config)
    if not config.is_file():
        raise MetarlError(f"--config {args.config}: no such file")
    sets = tuple(parse_set(item) for item in args.set or ())
    keys = [key for key, _ in sets]
    if "seed" in keys or len(set(keys)) != len(keys):
        raise MetarlError("--set: each key once, and seeds through --seeds")
    spec = SweepSpec(str(config.resolve()), parse_seeds(args.seeds) if args.seeds else (), sets)
    rows = run_sweep(spec, Path(args.out), resume=args.resume, address=args.address)
    print_results(rows, (["seed"] if spec.seeds else []) + keys)
    print(f"wrote {Path(args.out) / 'results.json'} and results.csv")
    failed = [row["trial"] for row in rows if row["status"] != "done"]
    if failed:
        print(f"error: trial(s) not done: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
