"""Inference cost per control tick: onnxruntime (deployed) vs torch, in the same run (issue #5).

    .venv/bin/python benchmarks/onnx_inference.py [--model models/pearl/model.pt] [--ticks 5000]

A control tick of the adaptive policy is ``observe(s, a, r, s')`` (the streaming posterior
takes the newest transition) followed by ``act(s')``, as the control loop calls them. Both
runtimes get the same recorded transitions (a simulated episode with a payload) and are timed
tick by tick with ``time.perf_counter_ns``, alternating blocks so machine load hits both alike:

* ONNX -- :class:`metarl_ros.policy.onnx_policy.OnnxAdaptivePolicy` (what onnx_policy_node runs):
  ``observe`` stores the transition, ``act`` runs ``step.onnx`` (new factor, product of
  Gaussians over the window, policy) in one onnxruntime call; 1 intra-op / 1 inter-op thread,
  inputs and outputs bound once to numpy buffers (I/O binding). The bare onnxruntime calls
  are timed too, to separate onnxruntime from the wrapper's numpy work: each graph with I/O
  binding, ``step.onnx`` with plain ``InferenceSession.run`` and feeds, and -- the floor of any
  onnxruntime call -- an empty graph (one Identity on 8 floats) through the pybind call the
  wrapper uses and through the public ``run_with_iobinding``.
* ONNX, ``posterior_update='context'`` -- the same class with the encoder off the control
  path: ``act`` runs ``policy.onnx`` on the latent of the last update and ``update_context()``
  (timed apart) folds the queued transitions in every ``control_rate / --context-rate-hz``
  ticks, one ``encoder.onnx`` call each.
* torch -- :class:`metarl_ros.policy.torch_policy.TorchAdaptivePolicy` (adapter_node's
  ``pearl``), one torch thread, no MAML adaptation: ``observe`` runs the encoder on the new
  transition, ``act`` forms the product over the window and runs the actor.

Model: ``--model`` if it exists (default ``models/pearl/model.pt``, with its shipped
``onnx/`` export if that is there, else exported to a temporary folder with
``metarl_ros.policy.onnx_export.export_model``), else an untrained model of the shipped
architecture (``config/train_pearl.yaml``) -- the cost does not depend on the weights. The
result says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = "models/pearl/model.pt"
SHIPPED_CONFIG = "config/train_pearl.yaml"


def prepare_model(model: str, workdir: Path) -> tuple[Path, Path, str]:
    """``(model.pt, export dir, description)``; builds an untrained stand-in if needed."""
    from metarl_ros.core.resources import resolve_path
    from metarl_ros.policy.onnx_export import export_model

    path = resolve_path(model)
    if path.exists():
        description = f"{model} (as given)"
    else:
        from metarl_ros.learning.config import load_train_config
        from metarl_ros.learning.trainer import Trainer

        config = load_train_config(resolve_path(SHIPPED_CONFIG))
        path = Trainer(config, workdir / "run", progress=False).write_final_model()
        agent = config.agent
        description = (f"untrained stand-in for {model} (not there yet): {SHIPPED_CONFIG} "
                       f"architecture, actor {agent.actor_hidden}, encoder "
                       f"{agent.encoder_hidden}, latent {agent.latent_dim}, window "
                       f"{config.context_window}")
    onnx_dir = path.parent / "onnx"
    if not (onnx_dir / "policy.onnx").exists():
        onnx_dir = workdir / "onnx"
        if not (onnx_dir / "policy.onnx").exists():
            export_model(path, onnx_dir)
    return path, onnx_dir, description


def recorded_transitions(setup, policy, steps: int) -> list[tuple]:
    """(obs, action, reward, next_obs) of a simulated episode with a 2 kg payload."""
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.tasks import TaskParams

    env = ArmTrackingEnv(setup)
    obs, _ = env.reset(seed=3, options={"task": TaskParams(payload_mass=2.0)})
    records = []
    try:
        for _ in range(steps):
            action = policy.act(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            records.append((obs, action, float(reward), next_obs))
            obs = next_obs
            if terminated or truncated:
                obs, _ = env.reset()
    finally:
        env.close()
    return records


def _stats(ns: list[int]) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "mean_us": float(us.mean()),
            "p99_us": float(np.percentile(us, 99)), "n": int(us.size)}


def time_ticks(policy, records, block: int,
               update_every: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Per-tick observe and act times (ns) for ``block`` ticks, and with ``update_every`` the
    times of ``policy.update_context()`` called after every ``update_every``-th tick (as the
    control loop does at its context rate)."""
    observe_ns, act_ns, update_ns = [], [], []
    clock = time.perf_counter_ns
    for i, (obs, action, reward, next_obs) in enumerate(records[:block]):
        t0 = clock()
        policy.observe(obs, action, reward, next_obs)
        t1 = clock()
        policy.act(next_obs)
        t2 = clock()
        observe_ns.append(t1 - t0)
        act_ns.append(t2 - t1)
        if update_every and i % update_every == update_every - 1:
            t0 = clock()
            policy.update_context()
            update_ns.append(clock() - t0)
    return observe_ns, act_ns, update_ns


def _empty_graph(path: Path):
    """An onnxruntime session of one Identity node on (1, 8) floats, its buffers bound."""
    import onnx
    from onnx import TensorProto, helper

    from metarl_ros.policy.onnx_policy import _BoundGraph, _open_session

    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                              [spec[0]], [spec[1]])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    session = _open_session(path)
    buffers = {"x": np.zeros((1, 8), np.float32), "y": np.zeros((1, 8), np.float32)}
    return session, _BoundGraph(session, path, buffers), buffers


def time_sessions(deployed, records, count: int, block: int,
                  workdir: Path) -> dict[str, list[int]]:
    """``act`` without a new transition (``policy.onnx`` through the wrapper), and bare
    onnxruntime calls: every graph with I/O binding (what the wrapper runs), ``step.onnx``
    with ``InferenceSession.run`` and feeds, and an empty graph."""
    obs, action, reward, next_obs = records[0]
    window = deployed._window
    step_feeds = {
        "transition": np.concatenate([obs, action, [reward], next_obs]).astype(np.float32)[None],
        "obs": next_obs.astype(np.float32)[None],
        "window_precision": window[0].copy(), "window_weighted": window[1].copy()}
    step_session = deployed._step._session
    empty, empty_bound, _ = _empty_graph(workdir / "empty.onnx")
    empty_binding = empty_bound._binding
    calls = {
        # what a tick would cost if the posterior were updated at the context rate instead:
        # act with no new transition runs policy.onnx on the held latent (after reset, and
        # after posterior() has folded a transition in, the node takes this path too)
        "act_without_new_transition": lambda: deployed.act(next_obs),
        "step_iobinding": deployed._step.run,
        "policy_iobinding": deployed._policy.run,
        "encoder_iobinding": deployed._encoder.run,
        "step_run_with_feeds": lambda: step_session.run(None, step_feeds),
        "empty_graph_iobinding": empty_bound.run,
        "empty_graph_public_run_with_iobinding": lambda: empty.run_with_iobinding(empty_binding),
    }
    times: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    done = 0
    while done < count:  # alternating blocks of consecutive calls, as for the ticks
        for name, call in calls.items():
            for _ in range(block):
                t0 = clock()
                call()
                times[name].append(clock() - t0)
        done += block
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SHIPPED_MODEL,
                        help="model.pt to export and time (missing: untrained stand-in)")
    parser.add_argument("--ticks", type=int, default=5000, help="timed ticks per runtime")
    parser.add_argument("--block", type=int, default=500, help="ticks per alternating block")
    parser.add_argument("--context-rate-hz", type=float, default=10.0,
                        help="update_context rate for posterior_update=context (node default)")
    parser.add_argument("--keep", type=Path,
                        help="build the stand-in model (model.pt + onnx/) in this directory and "
                             "keep it (e.g. for benchmarks/ros_latency.py) instead of a temp one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()[0]
    import onnxruntime
    import torch

    torch.set_num_threads(1)
    from metarl_ros.learning.saved_model import load_model
    from metarl_ros.policy.onnx_policy import OnnxAdaptivePolicy
    from metarl_ros.policy.torch_policy import TorchAdaptivePolicy
    from metarl_ros.sim.env_config import load_env_setup

    with tempfile.TemporaryDirectory(prefix="onnx_bench_") as tmp:
        workdir = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        model_path, onnx_dir, description = prepare_model(args.model, workdir)
        loaded = load_model(model_path)
        torch_policy = TorchAdaptivePolicy(loaded)
        onnx_policy = OnnxAdaptivePolicy(onnx_dir)
        context_policy = OnnxAdaptivePolicy(onnx_dir, posterior_update="context")
        setup = load_env_setup(loaded.payload["env_config"])
        every = max(1, round(setup.config.control_rate_hz / args.context_rate_hz))
        records = recorded_transitions(setup, torch_policy, args.block)
        runtimes = (("onnx", onnx_policy, 0), ("onnx_context", context_policy, every),
                    ("torch", torch_policy, 0))
        for _, policy, update_every in runtimes:  # warm up, fill the windows
            policy.reset()
            time_ticks(policy, records, min(200, args.block), update_every)
        results: dict[str, list[int]] = {f"{name}_{part}": [] for name, _, _ in runtimes
                                         for part in ("observe", "act", "update")}
        done = 0
        while done < args.ticks:
            for name, policy, update_every in runtimes:
                for part, ns in zip(("observe", "act", "update"),
                                    time_ticks(policy, records, args.block, update_every)):
                    results[f"{name}_{part}"] += ns
            done += args.block
        sessions = time_sessions(onnx_policy, records, args.ticks, args.block, workdir)

    summary = {
        "command": "python benchmarks/onnx_inference.py " + " ".join(argv or sys.argv[1:]),
        "model": description,
        "versions": f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
                    f"Python {platform.python_version()}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        "onnx_tick": _stats([a + b for a, b in zip(results["onnx_observe"],
                                                    results["onnx_act"])]),
        "onnx_observe (store the transition)": _stats(results["onnx_observe"]),
        "onnx_act (step.onnx: encoder tick + policy)": _stats(results["onnx_act"]),
        **{(name if name.startswith("act") else f"onnx_bare_{name}"): _stats(ns)
           for name, ns in sessions.items()},
        "onnx_context_tick (posterior_update=context: observe + act)": _stats(
            [a + b for a, b in zip(results["onnx_context_observe"],
                                   results["onnx_context_act"])]),
        f"onnx_context_update_context (every {every} ticks)": _stats(
            results["onnx_context_update"]),
        "onnx_context_work_per_tick_us (tick p50 + update p50 / ticks per update)": (
            float(np.percentile(np.add(results["onnx_context_observe"],
                                       results["onnx_context_act"]), 50))
            + float(np.percentile(results["onnx_context_update"], 50)) / every) / 1e3,
        "torch_tick": _stats([a + b for a, b in zip(results["torch_observe"],
                                                     results["torch_act"])]),
        "torch_observe (encoder)": _stats(results["torch_observe"]),
        "torch_act (product + actor)": _stats(results["torch_act"]),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
