"""``metarl launch <graph> [name:=value ...] [--duration S]``: a node graph without ros2 launch.

Runs the nodes of a :mod:`metarl_ros.graph.spec` description in this process, each with its
parameter files and overrides (exactly what ``launch/<graph>.launch.py`` hands to
``ros2 launch``), on one executor (single-threaded by default: the simulation loop has its
own thread, and rclpy's MultiThreadedExecutor costs more CPU than it saves here; ``--threads``
> 1 selects it). ``--duration`` stops after that many
*simulated* seconds (wall seconds for a graph without sim_node, e.g. ``deploy``); otherwise
Ctrl-C (or SIGTERM) stops it, with exit code 0 when the shutdown is clean; a second Ctrl-C
during shutdown is ignored.

Examples::

    metarl launch adapt_sim real_time_factor:=0.0 --duration 10
    metarl launch adapt_sim policy:=pearl model:=models/pearl/model.pt adaptation:=false
    metarl launch adapt_sim policy:=onnx model:=models/pearl/onnx
    metarl launch deploy model:=models/pearl/onnx joint_states:=/robot/joint_states
    metarl launch adapt_sim --show-args

DDS settings (ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE, ...) come from the environment.
"""

from __future__ import annotations

import argparse
import sys
import time

from metarl_ros.graph.runner import GraphReport, run_graph, stop_on_signals
from metarl_ros.graph.spec import GRAPHS


def _parse(args: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="metarl launch",
        description="Start a node graph in one process (same nodes and parameters as "
                    "ros2 launch metarl_ros <graph>.launch.py).")
    parser.add_argument("graph", choices=sorted(GRAPHS), help="which graph")
    parser.add_argument("assignments", nargs="*", metavar="name:=value",
                        help="launch arguments (see --show-args)")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many simulated seconds (wall seconds without "
                             "sim_node; default: until Ctrl-C)")
    parser.add_argument("--show-args", action="store_true",
                        help="list the graph's launch arguments and exit")
    parser.add_argument("--threads", type=int, default=1,
                        help="executor threads (default 1: SingleThreadedExecutor, the cheapest "
                             "in rclpy; >1: MultiThreadedExecutor)")
    ns = parser.parse_args(args)
    values = {}
    for item in ns.assignments:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            parser.error(f"expected name:=value, got {item!r}")
        values[name] = value
    if ns.duration is not None and ns.duration <= 0:
        parser.error("--duration must be > 0")
    return ns, values


def _show_args(graph_name: str) -> None:
    declared, _ = GRAPHS[graph_name]
    print(f"Arguments of {graph_name} (name:=value):")
    for arg in declared:
        choices = f" [{'|'.join(arg.launch_choices)}]" if arg.launch_choices else ""
        print(f"  {arg.name}{choices} (default: {arg.default!r})\n      {arg.description}")


def print_report(report: GraphReport) -> None:
    """One line per node with counters (the end of every ``metarl launch``)."""
    for name, v in report.nodes.items():
        if "lockstep_timeouts" in v:
            line = (f"t = {v['sim_time_s']:.2f} s simulated, real-time factor "
                    f"{v['real_time_factor']:.2f}, commands {v['commands']} "
                    f"({v['commands_rejected']} rejected), lockstep timeouts "
                    f"{v['lockstep_timeouts']}, tracking RMS {v['tracking_rms_mrad']:.2f} mrad")
        else:
            line = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                             for key, value in v.items())
        print(f"[metarl launch] {name}: {line}", flush=True)


def launch_command(args: list[str]) -> int:
    """Entry point of ``metarl launch``; returns the exit code."""
    ns, values = _parse(args)
    if ns.show_args:
        _show_args(ns.graph)
        return 0
    _, build = GRAPHS[ns.graph]
    try:
        graph = build(values)
    except ValueError as exc:
        print(f"metarl launch: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    with stop_on_signals() as stop:
        try:
            report = run_graph(graph, ns.duration, ns.threads, stop)
            print_report(report)
            code = report.code
        except Exception as exc:  # start-up errors: one readable line
            print(f"metarl launch: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        print(f"[metarl launch] done in {time.monotonic() - start:.1f} s wall, exit {code}",
              flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(launch_command(sys.argv[1:]))
