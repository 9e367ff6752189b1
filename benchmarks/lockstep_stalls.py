"""Lockstep round trip of sim_node <-> adapter_node in one process, and what stalls it.

    .venv/bin/python benchmarks/lockstep_stalls.py                      # as shipped
    .venv/bin/python benchmarks/lockstep_stalls.py --executor multi --no-freeze   # as before

One process (like ``metarl launch`` and the DDS tests): sim_node in lockstep
(``real_time_factor: 0``) and adapter_node on one executor, over DDS on loopback. For every
control period this measures the *round trip*: sim_node publishing clock, reference and joint
state for instant t -> the command that answers t reaching sim_node (wall time; sim_node's
``lockstep_timeout`` applies to exactly this interval). Beside it, it records what stops the
whole process: full garbage-collector passes (``gc.callbacks``) and gaps of a 2 ms heartbeat
thread (time during which no Python thread of the process could run).

``--policy pearl`` (default) loads the shipped PEARL model, so the process carries torch's heap,
as a real controller does; ``--no-freeze`` skips ``freeze_heap`` (what ``run_node`` does after
start-up); ``--executor multi`` uses a 2-thread MultiThreadedExecutor.
Report the machine's load (``uptime``) with the numbers: on a shared machine they depend on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time

import numpy as np


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="lockstep runs (fresh nodes each)")
    parser.add_argument("--duration", type=float, default=4.0, help="simulated s per run")
    parser.add_argument("--executor", choices=("single", "multi"), default="single")
    parser.add_argument("--no-freeze", action="store_true", help="do not freeze the heap")
    parser.add_argument("--policy", choices=("pd", "pearl"), default="pearl")
    parser.add_argument("--model", default="models/pearl/model.pt")
    parser.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", 0)) or
                        os.getpid() % 101 + 1)
    return parser.parse_args()


class StallMonitor:
    """Full-GC pauses and whole-process gaps (a heartbeat thread that sleeps 2 ms)."""

    def __init__(self) -> None:
        self.gc_ms: list[float] = []
        self.gaps_ms: list[float] = []
        self._gc_start = 0.0
        self.active = False
        gc.callbacks.append(self._on_gc)
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self.active and info["generation"] == 2:
            self.gc_ms.append((time.perf_counter() - self._gc_start) * 1e3)

    def _heartbeat(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(0.002)
            now = time.monotonic()
            if self.active:
                self.gaps_ms.append((now - last) * 1e3)
            last = now


def _full_gc_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    args = _parse()
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from metarl_ros.nodes.adapter_node import AdapterNode
    from metarl_ros.nodes.common import freeze_heap
    from metarl_ros.nodes.sim_node import SimNode

    round_trips: list[float] = []

    class TimedSim(SimNode):
        """sim_node, timing each lockstep wait from the publication it answers."""

        def _publish_state(self) -> int:
            self._published_at = time.perf_counter()
            return super()._publish_state()

        def _wait_for_command(self, seq: int):
            command = super()._wait_for_command(seq)
            if self.started.is_set():
                round_trips.append((time.perf_counter() - self._published_at) * 1e3)
            return command

    monitor = StallMonitor()
    context = Context()
    rclpy.init(context=context, domain_id=args.domain)
    timeouts = 0
    startup: dict[str, float] = {}
    try:
        for run in range(args.runs):
            adapter_params = [Parameter("use_sim_time", value=True),
                              Parameter("policy", value=args.policy)]
            if args.policy == "pearl":
                adapter_params.append(Parameter("model_path", value=args.model))
            adapter = AdapterNode(context=context, parameter_overrides=adapter_params)
            sim = TimedSim(context=context, parameter_overrides=[
                Parameter("real_time_factor", value=0.0),
                Parameter("duration_s", value=args.duration),
                Parameter("scenario", value="config/scenarios/default.yaml")])
            if run == 0:  # what one full collection costs with the nodes' heap
                startup["objects"] = len(gc.get_objects())
                startup["full_gc_ms"] = _full_gc_ms()
            if not args.no_freeze:
                freeze_heap()
                if run == 0:
                    startup["full_gc_ms_after_freeze_heap"] = _full_gc_ms()
            # a fresh executor per run, shut down before the nodes are destroyed
            executor = (MultiThreadedExecutor(num_threads=2, context=context)
                        if args.executor == "multi" else SingleThreadedExecutor(context=context))
            executor.add_node(adapter)
            executor.add_node(sim)
            spin = threading.Thread(target=executor.spin, daemon=True)
            monitor.active = True
            spin.start()
            finished = sim.finished.wait(args.duration * 20 + 30)
            monitor.active = False
            executor.shutdown(timeout_sec=2.0)
            spin.join(timeout=5.0)
            if not finished:
                raise RuntimeError(f"sim stuck at t={sim.sim.time_s}")
            timeouts += sim.lockstep_timeouts
            for node in (sim, adapter):
                node.destroy_node()
            gc.unfreeze()
            gc.collect()
    finally:
        rclpy.try_shutdown(context=context)
    trips = np.array(round_trips)
    gaps = np.array(monitor.gaps_ms) if monitor.gaps_ms else np.zeros(1)
    print(json.dumps({
        "executor": args.executor, "freeze_heap": not args.no_freeze, "policy": args.policy,
        "load_average": os.getloadavg(), "periods": int(trips.size),
        "lockstep_timeouts": timeouts,
        "round_trip_ms": {"p50": round(float(np.median(trips)), 2),
                          "p99": round(float(np.percentile(trips, 99)), 1),
                          "max": round(float(trips.max()), 1),
                          "over_100ms": int((trips > 100).sum())},
        "startup_heap": {k: round(v, 1) for k, v in startup.items()},
        "full_gc_ms_during_runs": {"count": len(monitor.gc_ms),
                       "max": round(max(monitor.gc_ms, default=0.0), 1)},
        "process_gap_ms": {"p99": round(float(np.percentile(gaps, 99)), 1),
                           "max": round(float(gaps.max()), 1)},
    }, indent=1))


if __name__ == "__main__":
    main()
