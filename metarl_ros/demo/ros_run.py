"""One demo run through the ROS node graph: ``adapt_sim`` with a monitor beside it.

The graph comes from :func:`metarl_ros.graph.adapt_sim_graph` and runs through
:func:`metarl_ros.graph.runner.run_graph` -- the same description and runner as
``metarl launch adapt_sim`` -- with one extra node, :class:`DemoMonitor`, that only listens:
``/joint_states`` and ``/reference`` (tracking error), ``/<controller node>/latent`` and
``/sim/true_task`` (the faults as the simulator applied them).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from metarl_ros.evaluation.trace import Trace, TraceRecorder
from metarl_ros.graph.runner import run_graph
from metarl_ros.graph.spec import adapt_sim_graph
from metarl_ros.nodes.demo_monitor import DemoMonitor


@dataclass(frozen=True)
class RosRunResult:
    trace: Trace
    counters: dict[str, dict[str, Any]]
    """end-of-run counters per graph node (lockstep timeouts, late ticks, ...)."""
    wall_s: float
    code: int


def run_adapt_sim(arguments: dict[str, str], duration_s: float,
                  stop: threading.Event | None = None,
                  log_level: str | None = "warn") -> RosRunResult:
    """Run ``adapt_sim`` with launch ``arguments`` (``name -> value`` strings, as
    ``name:=value``) for ``duration_s`` simulated seconds; returns what the monitor saw."""
    graph = adapt_sim_graph(arguments)
    controller = next(spec.name for spec in graph.nodes
                      if spec.name not in ("sim_node", "recorder_node"))
    recorder = TraceRecorder()

    def monitor(context) -> DemoMonitor:
        return DemoMonitor(recorder, f"/{controller}/latent", context=context)

    start = time.monotonic()
    report = run_graph(graph, duration_s, stop=stop, companions=[monitor], log_level=log_level)
    return RosRunResult(recorder.trace(), report.nodes, time.monotonic() - start, report.code)
