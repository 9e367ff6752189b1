"""``metarl demo``: entry point (argument checks, the runs, the report)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarl_ros.core.errors import MetarlError
from metarl_ros.core.files import atomic_write_json
from metarl_ros.core.resources import resolve_path
from metarl_ros.demo.report import (
    PhaseWindows,
    all_finite,
    describe_windows,
    flatten,
    format_table,
    plot,
)
from metarl_ros.evaluation.trace import Trace
from metarl_ros.graph.spec import ADAPT_SIM_ARGUMENTS
from metarl_ros.sim.scenario import Scenario, load_scenario

_DEFAULTS = {arg.name: arg.default for arg in ADAPT_SIM_ARGUMENTS}
DEFAULT_MODEL = _DEFAULTS["model"]
DEFAULT_SCENARIO = _DEFAULTS["scenario"]
DEFAULT_ENV = _DEFAULTS["env_config"]


class DemoError(MetarlError):
    """The demo cannot run as asked (missing model, no ROS, bad option)."""


@dataclass(frozen=True)
class DemoRun:
    """One controller configuration of the demo: a row of the table."""

    name: str
    description: str
    arguments: dict[str, str]
    """adapt_sim launch arguments (``name:=value``) besides model, scenario and pacing."""


@dataclass(frozen=True)
class RunOutcome:
    """What one run hands to the report."""

    trace: Trace
    wall_s: float
    exit_code: int = 0
    nodes: dict[str, dict[str, Any]] | None = None
    """end-of-run counters per graph node (ROS runs): lockstep timeouts, late ticks, ..."""
    launch_arguments: dict[str, str] | None = None
    """the adapt_sim arguments of the run (ROS runs)."""

    def summary(self, run: DemoRun, errors: dict[str, Any]) -> dict[str, Any]:
        """This run's entry in ``summary.json``."""
        return {
            "description": run.description,
            "launch_arguments": self.launch_arguments,
            "tracking_error_rad": errors,
            "samples": int(self.trace.time_s.size),
            "events_seen": [{"time_s": t, "label": label} for t, label in self.trace.events],
            "wall_s": round(self.wall_s, 2),
            "nodes": self.nodes,
        }


#: The demo's runs: adapt_sim with these launch arguments (``--no-ros``: the same
#: controllers on the env directly).
DEMO_RUNS = (
    DemoRun("pd", "PD + the nominal arm's feed-forward, no adaptation (policy:=pd, no learned "
            "policy)", {"policy": "pd"}),
    DemoRun("dob", "momentum disturbance observer on computed torque, at the PD's compliance "
            "(policy:=dob)", {"policy": "dob"}),
    DemoRun("adaptive_ct", "Slotine-Li adaptive computed torque, payload and motor strengths, "
            "at the PD's compliance (policy:=adaptive_ct)", {"policy": "adaptive_ct"}),
    DemoRun("adaptive_ff", "PD + nominal feed-forward + online adaptation of the fault "
            "parameters on the model features, no learned policy (policy:=pd "
            "parameter_adaptation:=true)", {"policy": "pd", "parameter_adaptation": "true"}),
    DemoRun("adaptation_off",
            "PEARL, adaptation:=false (latent held at the prior: the un-adapted policy)",
            {"policy": "pearl", "adaptation": "false", "maml": "false"}),
    DemoRun("pearl", "PEARL, adaptation:=true maml:=false (context posterior over 0.25 s)",
            {"policy": "pearl", "adaptation": "true", "maml": "false"}),
    DemoRun("pearl_maml", "PEARL + MAML dynamics correction, adaptation:=true maml:=true",
            {"policy": "pearl", "adaptation": "true", "maml": "true"}),
    DemoRun("pearl_adapt", "PEARL + online refinement of its fault parameters, "
            "adaptation:=true maml:=false parameter_adaptation:=true",
            {"policy": "pearl", "adaptation": "true", "maml": "false",
             "parameter_adaptation": "true"}),
)


def resolve_model(path: str | None) -> Path:
    """The model file for ``--model`` (a model.pt or a directory holding one; None = the
    graph's default)."""
    model = resolve_path(path or DEFAULT_MODEL)
    if model.is_dir():
        model = model / "model.pt"
    if not model.is_file():
        raise DemoError(f"{model}: no model file. Pass --model with a PEARL model.pt (shipped: "
                        f"{DEFAULT_MODEL}); train one with `metarl train --config "
                        "config/train_pearl.yaml --out runs/pearl`")
    return model


def load_pearl_model(model: Path):
    """Load ``model`` once before any run, so a wrong file fails at once and clearly: it must
    be a PEARL model (latent-conditioned) with a MAML dynamics model (adaptation on)."""
    import torch

    from metarl_ros.learning.saved_model import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)  # CheckpointError names the file and the problem
    if loaded.agent.spec.conditioning != "latent":
        raise DemoError(f"{model}: a {loaded.method!r} model; the demo needs a PEARL model "
                        f"(shipped: {DEFAULT_MODEL})")
    if loaded.maml_config is None or not loaded.dynamics:
        raise DemoError(f"{model}: has no MAML dynamics model, which adaptation on needs; "
                        "train with dynamics.enabled (config/train_pearl.yaml)")
    return loaded


def _load_scenario(path: str | None, duration: float | None
                   ) -> tuple[Scenario, float, Path]:
    from metarl_ros.sim.env_config import load_env_setup

    scenario_path = resolve_path(path or DEFAULT_SCENARIO)
    joint_names = load_env_setup(DEFAULT_ENV).robot.joint_names
    scenario = load_scenario(scenario_path, joint_names)
    duration_s = duration if duration is not None else scenario.config.duration_s
    if duration_s is None:
        raise DemoError(f"{scenario_path}: no duration_s; pass --duration")
    if duration_s <= 0:
        raise DemoError(f"--duration {duration_s:g}: must be > 0")
    return scenario, float(duration_s), scenario_path


def _run_ros(runs, model: Path, scenario_path: Path, duration_s: float, rtf: float,
             verbose: bool) -> dict[str, RunOutcome]:
    try:
        from metarl_ros.demo.ros_run import run_adapt_sim
    except ImportError as exc:
        raise DemoError(f"the demo runs the ROS 2 node graph and needs rclpy ({exc}); install "
                        "the ros extra (pip install -e '.[ros]') or pass --no-ros") from None
    from metarl_ros.graph.runner import stop_on_signals

    results = {}
    with stop_on_signals("metarl demo") as stop:
        for run in runs:
            arguments = {**run.arguments, "model": str(model), "scenario": str(scenario_path),
                         "real_time_factor": repr(rtf)}
            print(f"running {run.name}: {run.description} ...", flush=True)
            result = run_adapt_sim(arguments, duration_s, stop,
                                   log_level=None if verbose else "warn")
            if stop.is_set():
                raise DemoError("interrupted")
            sim = result.counters.get("sim_node", {})
            controller = next((v for k, v in result.counters.items() if k != "sim_node"), {})
            print(f"  {result.wall_s:.1f} s wall, real-time factor "
                  f"{sim.get('real_time_factor', 0.0):.2f}, lockstep timeouts "
                  f"{sim.get('lockstep_timeouts', 0)}, late ticks "
                  f"{controller.get('late_tick_pct', 0.0):g} %, inference p99 "
                  f"{controller.get('inference_latency_p99_ms', 0.0):g} ms"
                  + (f", MAML adaptations {controller['maml_adaptations']}"
                     if "maml_adaptations" in controller else ""), flush=True)
            results[run.name] = RunOutcome(result.trace, result.wall_s, result.code,
                                           result.counters, arguments)
    return results


def _run_direct(runs, model: Path, env_config: str, scenario: Scenario, duration_s: float
                ) -> dict[str, RunOutcome]:
    """Each run on the env, its policy built as the graph's adapter_node builds it (same
    launch arguments -> same node parameters -> ``make_policy``), in lockstep."""
    from metarl_ros.demo.direct_run import run_env
    from metarl_ros.graph.spec import adapt_sim_graph
    from metarl_ros.policy.factory import make_policy
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.env_config import load_env_setup

    setup = load_env_setup(env_config)
    env = ArmTrackingEnv(setup)
    results = {}
    try:
        for run in runs:
            print(f"running {run.name}: {run.description} ...", flush=True)
            start = time.monotonic()
            graph = adapt_sim_graph({**run.arguments, "model": str(model),
                                     "real_time_factor": "0.0"})
            p = graph.node("adapter_node").parameters
            policy = make_policy(p["policy"], setup, model_path=p["model_path"],
                                 adaptation=p["adaptation"], maml=p["maml"],
                                 adaptation_schedule=p["adaptation_schedule"],
                                 parameter_adaptation=p["parameter_adaptation"])
            trace = run_env(env, scenario, duration_s, policy)
            results[run.name] = RunOutcome(trace, time.monotonic() - start)
    finally:
        env.close()
    return results


def _check(name: str, outcome: RunOutcome, expected_samples: int,
           errors: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of one run: problems make the demo fail (exit 1)."""
    problems, warnings = [], []
    if outcome.exit_code:
        problems.append(f"{name}: the graph stopped with exit code {outcome.exit_code}")
    samples = outcome.trace.time_s.size
    if samples < expected_samples:
        problems.append(f"{name}: tracking error at {samples} of {expected_samples} control "
                        "instants")
    timeouts = (outcome.nodes or {}).get("sim_node", {}).get("lockstep_timeouts", 0)
    if timeouts:
        warnings.append(f"{name}: {timeouts} lockstep timeout(s): the simulator stepped with "
                        "zero effort there, so this run's numbers are affected")
    if not all_finite(flatten(errors)):
        problems.append(f"{name}: a window has no finite tracking error")
    return problems, warnings


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every run finished with a finite error in every window."""
    model = resolve_model(args.model)
    scenario, duration_s, scenario_path = _load_scenario(args.scenario, args.duration)
    windows = PhaseWindows.for_scenario(scenario, duration_s)
    if args.real_time_factor < 0:
        raise DemoError(f"--real-time-factor {args.real_time_factor:g}: must be >= 0")
    loaded = load_pearl_model(model)
    mode = "direct" if args.no_ros else "ros"
    print(f"scenario {scenario.config.name} ({duration_s:g} s simulated): "
          f"{scenario.config.description.strip()}")
    print(f"model {model}; " + ("Gymnasium env, no ROS" if args.no_ros else
          "node graph adapt_sim (sim_node + adapter_node) over DDS, " +
          ("lockstep" if args.real_time_factor == 0 else
           f"real-time factor {args.real_time_factor:g}")), flush=True)
    start = time.monotonic()
    runs = DEMO_RUNS
    if args.no_ros:
        results = _run_direct(runs, model, loaded.payload["env_config"], scenario, duration_s)
    else:
        results = _run_ros(runs, model, scenario_path, duration_s, args.real_time_factor,
                           args.verbose)

    from metarl_ros.sim.env_config import load_env_setup

    dt = load_env_setup(DEFAULT_ENV).control_dt
    expected = int(round(duration_s / dt))
    table, problems, warnings, summary_runs = {}, [], [], {}
    for run in runs:
        outcome = results[run.name]
        errors = windows.errors(outcome.trace)
        table[run.name] = errors
        run_problems, run_warnings = _check(run.name, outcome, expected, errors)
        problems += run_problems
        warnings += run_warnings
        summary_runs[run.name] = outcome.summary(run, errors)
    print("\n" + describe_windows(windows))
    print(format_table(windows, table))
    for run in runs:
        print(f"  {run.name}: {run.description}")

    out = Path(args.out)
    summary = {
        "mode": mode,
        "model": str(model),
        "scenario": {"name": scenario.config.name, "path": str(scenario_path),
                     "duration_s": duration_s,
                     "events": [{"time_s": e.time_s, "label": e.label} for e in scenario.events]},
        "real_time_factor": None if args.no_ros else args.real_time_factor,
        "windows": windows.describe(),
        "runs": summary_runs,
        "problems": problems,
        "warnings": warnings,
        "wall_s": round(time.monotonic() - start, 2),
    }
    atomic_write_json(out / "summary.json", summary)
    source = "Gymnasium env (--no-ros)" if args.no_ros else "adapt_sim node graph"
    plot({name: outcome.trace for name, outcome in results.items()}, windows,
         f"scenario {scenario.config.name}: {source}", out / "tracking_error.png")
    print(f"\nwrote {out / 'summary.json'} and {out / 'tracking_error.png'} "
          f"({summary['wall_s']:.0f} s)")
    for warning in warnings:
        print(f"WARNING: {warning}")
    for problem in problems:
        print(f"ERROR: {problem}")
    return 1 if problems else 0
