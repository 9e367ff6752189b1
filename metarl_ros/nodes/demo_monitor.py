"""A node that only listens: tracking error, latent and faults of a running graph.

``/joint_states`` and ``/reference`` (tracking error), ``/<controller node>/latent`` and
``/sim/true_task`` (the faults as the simulator applied them), handed to a
:class:`~metarl_ros.evaluation.trace.TraceRecorder`. ``metarl demo`` runs it beside
``adapt_sim``.
"""

from __future__ import annotations

import json

from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String

from metarl_ros.evaluation.trace import TraceRecorder
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
