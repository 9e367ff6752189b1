"""What one control tick's work costs when it runs once per control period, not in a loop.

    .venv/bin/python benchmarks/cold_cache.py [--model models/pearl/onnx] [--gap 0.01]

Runs ``step.onnx`` of an exported PEARL model (one control tick of onnx_policy_node) and a
small numpy expression, each after sleeping ``--gap`` seconds (a 100 Hz control loop idles
10 ms between ticks), then once more right away, and prints the p50/p99 of each (ms). On
a shared virtual machine the first call after the idle gap costs several times the second:
caches and branch predictors are cold again. A node's sensor-to-command time is made of such
first calls, which is why the loop moves work off the joint state's path rather than making
it cheaper in a hot loop (docs/BENCHMARKS.md, "ROS nodes: sensor-to-command latency").
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from metarl_ros.policy.onnx_policy import OnnxAdaptivePolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pearl/onnx")
    parser.add_argument("--gap", type=float, default=0.01, help="idle seconds before a call")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    policy = OnnxAdaptivePolicy(args.model)
    step = policy._step or policy._policy  # noqa: SLF001 - the bound graph itself
    x = np.random.default_rng(0).normal(size=140)
    times: dict[str, list[float]] = {k: [] for k in ("step.onnx after the gap",
                                                     "step.onnx again at once",
                                                     "numpy op after the gap",
                                                     "numpy op again at once")}
    for _ in range(args.calls):
        time.sleep(args.gap)
        for name, call in (("numpy op", lambda: x * 2.0 + 1.0), ("step.onnx", step.run)):
            start = time.perf_counter()
            call()
            middle = time.perf_counter()
            call()
            end = time.perf_counter()
            times[f"{name} after the gap"].append(middle - start)
            times[f"{name} again at once"].append(end - middle)
    for name, values in times.items():
        v = np.asarray(values[30:]) * 1e3
        print(f"{name:26s} p50 {np.percentile(v, 50):.3f} ms  p99 {np.percentile(v, 99):.3f} ms")


if __name__ == "__main__":
    main()
