"""One demo run through the ROS node graph: ``adapt_sim`` with a monitor beside it.

The graph comes from :func:`metarl_ros.graph.adapt_sim_graph` and runs through
:func:`metarl_ros.cli.launch.run_graph` -- the same description and runner as
``metarl launch adapt_sim`` -- with one extra node, :class:`DemoMonitor`, that only listens:
``/joint_states`` and ``/reference`` (tracking error), ``/<controller node>/latent`` and
``/sim/true_task`` (the faults as the simulator applied them).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String

from metarl_ros.cli.launch import run_graph
from metarl_ros.demo.trace import Trace, TraceRecorder
from metarl_ros.graph import adapt_sim_graph
from metarl_ros.nodes.common import LATCHED_QOS, STATE_QOS


class DemoMonitor(Node):
    """Listens to the graph and hands every message to a :class:`TraceRecorder`."""

    def __init__(self, recorder: TraceRecorder, latent_topic: str, **kwargs) -> None:
        super().__init__("demo_monitor", **kwargs)
        self.recorder = recorder
        self.create_subscription(JointState, "/joint_states", self._on_state, STATE_QOS)
        self.create_subscription(JointState, "/reference", self._on_reference, STATE_QOS)
        self.create_subscription(Float64MultiArray, latent_topic, self._on_latent, STATE_QOS)
        self.create_subscription(String, "/sim/true_task", self._on_task, LATCHED_QOS)

    @staticmethod
    def _stamp_ns(msg: JointState) -> int:
        return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec

    def _on_state(self, msg: JointState) -> None:
        self.recorder.add_state(self._stamp_ns(msg), msg.name, msg.position)

    def _on_reference(self, msg: JointState) -> None:
        self.recorder.add_reference(self._stamp_ns(msg), msg.name, msg.position)

    def _on_latent(self, msg: Float64MultiArray) -> None:
        # data = mean (d values) then std (d values), see adapter_node
        d = len(msg.data) // 2
        self.recorder.add_latent(msg.data[:d])

    def _on_task(self, msg: String) -> None:
        change = json.loads(msg.data)
        if change.get("label") != "initial":
            self.recorder.add_event(change["time_s"], change["label"])


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
