"""Inference cost per control tick: onnxruntime (deployed) vs torch, in the same run (issue #5).

    .venv/bin/python benchmarks/onnx_inference.py [--model models/pearl/model.pt] [--ticks 5000]

A control tick of the adaptive policy is ``observe(s, a, r, s')`` (the streaming posterior
takes the newest transition) followed by ``act(obs)``. Both runtimes get the same recorded
transitions (a simulated episode with a payload) and are timed tick by tick with
``time.perf_counter_ns``, alternating blocks so machine load hits both alike:

* ONNX -- :class:`metarl_ros.deploy.OnnxAdaptivePolicy` (what onnx_policy_node runs): the
  encoder tick graph (new factor + product of Gaussians over the window) in ``observe``, the
  policy graph in ``act``; onnxruntime with 1 intra-op / 1 inter-op thread, inputs and
  outputs bound once to numpy buffers (I/O binding). The bare onnxruntime calls are timed
  too -- ``run_with_iobinding`` as used, and plain ``InferenceSession.run`` with feeds -- to
  separate onnxruntime from the wrapper's numpy work (filling the transition, ring shift).
* torch -- :class:`metarl_ros.learning.runtime.TorchAdaptivePolicy` (adapter_node's
  ``pearl``), one torch thread, no MAML adaptation: ``observe`` runs the encoder on the new
  transition, ``act`` forms the product over the window and runs the actor.

Model: ``--model`` if it exists (default ``models/pearl/model.pt``, exported to a temporary
folder with ``metarl_ros.learning.export.export_model``), else an untrained model of the
shipped architecture (``config/train_pearl.yaml``: 128x128 actor and encoder, latent 8,
window 25) -- the cost does not depend on the weights. The result says which.
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
    from metarl_ros.learning.export import export_model
    from metarl_ros.resources import resolve_path

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


def time_ticks(policy, records, block: int) -> tuple[list[int], list[int]]:
    """Per-tick observe and act times (ns) for ``block`` ticks."""
    observe_ns, act_ns = [], []
    clock = time.perf_counter_ns
    for obs, action, reward, next_obs in records[:block]:
        t0 = clock()
        policy.observe(obs, action, reward, next_obs)
        t1 = clock()
        policy.act(next_obs)
        t2 = clock()
        observe_ns.append(t1 - t0)
        act_ns.append(t2 - t1)
    return observe_ns, act_ns


def time_sessions(deployed, records, count: int) -> dict[str, list[int]]:
    """Bare onnxruntime calls of the encoder and policy graphs: ``run_with_iobinding`` on the
    bound buffers (what the wrapper does) and plain ``InferenceSession.run`` with feeds."""
    obs, action, reward, next_obs = records[0]
    k, latent = deployed._window_mean.shape
    encoder_feeds = {
        "transition": np.concatenate([obs, action, [reward], next_obs]).astype(np.float32)[None],
        "window_mean": np.zeros((k, latent), np.float32),
        "window_var": np.ones((k, latent), np.float32),
        "window_mask": np.ones((k,), np.float32)}
    policy_feeds = {"obs": obs.astype(np.float32)[None],
                    "latent": np.zeros((1, latent), np.float32)}
    calls = {
        "encoder_iobinding": deployed._encoder_graph.run,
        "policy_iobinding": deployed._policy_graph.run,
        "encoder_run": lambda: deployed._encoder.run(None, encoder_feeds),
        "policy_run": lambda: deployed._policy.run(None, policy_feeds),
    }
    times: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    for _ in range(count):
        for name, call in calls.items():
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SHIPPED_MODEL,
                        help="model.pt to export and time (missing: untrained stand-in)")
    parser.add_argument("--ticks", type=int, default=5000, help="timed ticks per runtime")
    parser.add_argument("--block", type=int, default=500, help="ticks per alternating block")
    parser.add_argument("--keep", type=Path,
                        help="build the stand-in model (model.pt + onnx/) in this directory and "
                             "keep it (e.g. for benchmarks/ros_latency.py) instead of a temp one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    torch.set_num_threads(1)
    from metarl_ros.deploy import OnnxAdaptivePolicy
    from metarl_ros.learning.runtime import TorchAdaptivePolicy, load_model
    from metarl_ros.sim.env import load_env_setup

    with tempfile.TemporaryDirectory(prefix="onnx_bench_") as tmp:
        workdir = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        model_path, onnx_dir, description = prepare_model(args.model, workdir)
        loaded = load_model(model_path)
        torch_policy = TorchAdaptivePolicy(loaded)
        onnx_policy = OnnxAdaptivePolicy(onnx_dir)
        setup = load_env_setup(loaded.payload["env_config"])
        records = recorded_transitions(setup, torch_policy, args.block)
        for policy in (torch_policy, onnx_policy):  # warm up, fill the windows
            policy.reset()
            time_ticks(policy, records, min(200, args.block))
        results: dict[str, list[int]] = {key: [] for key in (
            "onnx_observe", "onnx_act", "torch_observe", "torch_act")}
        done = 0
        while done < args.ticks:
            for name, policy in (("onnx", onnx_policy), ("torch", torch_policy)):
                observe_ns, act_ns = time_ticks(policy, records, args.block)
                results[f"{name}_observe"] += observe_ns
                results[f"{name}_act"] += act_ns
            done += args.block
        sessions = time_sessions(onnx_policy, records, args.ticks)

    summary = {
        "command": "python benchmarks/onnx_inference.py " + " ".join(argv or sys.argv[1:]),
        "model": description,
        "versions": f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
                    f"Python {platform.python_version()}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.2f}",
        "onnx_tick": _stats([a + b for a, b in zip(results["onnx_observe"],
                                                    results["onnx_act"])]),
        "onnx_observe (encoder tick)": _stats(results["onnx_observe"]),
        "onnx_act (policy)": _stats(results["onnx_act"]),
        **{f"onnx_bare_{name}": _stats(ns) for name, ns in sessions.items()},
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
