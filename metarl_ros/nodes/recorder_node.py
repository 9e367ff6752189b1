"""recorder_node: record topics to a rosbag2 bag (MCAP or sqlite3) without decoding them.

Every run the robot makes is data for the next model (``metarl retrain``). This node is a
small ``ros2 bag record`` that also works where the ``ros2`` CLI is not installed:

* subscriptions are **raw** (``raw=True``): the CDR bytes go to the bag as they arrived, no
  deserialize/serialize per message;
* a writer thread owns the bag (:class:`metarl_ros.recording.writer.QueuedBagWriter`);
  callbacks only enqueue. Disk latency never blocks the executor, a Ctrl-C landing in a
  callback cannot leave a half-written record behind, and sqlite3 gets all its calls from one
  thread; that thread also **flushes** the bag to disk every ``flush_period_s`` (MCAP: the
  chunk is closed and fsync-ed; sqlite3: a commit);
* each message is stamped with its **receive time** (the rmw's ``received_timestamp``, system
  clock, ns) like ``ros2 bag record`` does; ``timestamps: node_clock`` uses the node's clock
  instead (simulated time with ``use_sim_time``);
* topics are subscribed when a publisher appears (polled every ``discovery_period_s``), with
  the publishers' QoS (RELIABLE only if every publisher is, TRANSIENT_LOCAL only if every
  publisher is -- so a latched topic like ``/sim/true_task`` is recorded from its last value);
  their type comes from the ``types`` parameter or, where that is empty, from the graph
  (``get_topic_names_and_types``); the offered QoS goes into the bag for ``ros2 bag play``;
* lost messages are counted per topic from gaps in the publishers' sequence numbers (when the
  rmw reports them), and logged when the bag closes.

As with ``ros2 bag record``, a topic is recorded from the moment its publisher has been seen
(within ``discovery_period_s``) and matched: start the recorder before the nodes whose first
messages matter (``adapt_sim.launch.py record:=true`` lists it first), and note that a
lockstep simulation starts stepping as soon as its controller answers.

The bag is closed -- flushed, indexed, ``metadata.yaml`` written -- when the node is
destroyed, on SIGINT and SIGTERM (a second signal during shutdown is ignored) and when its
context shuts down. A recorder killed with SIGKILL (or a power loss) leaves a bag without
``metadata.yaml`` that holds everything up to the last flush; ``metarl bag repair <bag>``
(:mod:`metarl_ros.recording.repair`) turns it into a complete bag.

Parameters
    ``output`` (''): bag directory, must not exist; '' = ``rosbag2_<YYYY_MM_DD-HH_MM_SS>`` in
    the working directory. ``storage`` (mcap | sqlite3), ``version`` (0 = 9 for mcap, 8 for
    sqlite3, which Humble plays). ``topics`` (string array), ``types`` (string array, same
    length or empty; '' entries are discovered). ``queue_depth`` (subscription history depth).
    ``timestamps`` (receive | node_clock). ``discovery_period_s``. ``flush_period_s`` (0.5:
    the most a kill can lose, s).

Default topics: ``/joint_states``, ``/effort_controller/commands``, ``/reference``,
``/adapter_node/latent``, ``/diagnostics``, ``/sim/true_task`` -- everything ``metarl retrain``
uses (state, command, reference, true task events) plus the latent and diagnostics for
inspection.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import rclpy.logging
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import Subscription

from metarl_ros.recording.formats import STORAGE_FORMATS, BagError, make_qos
from metarl_ros.recording.writer import QueuedBagWriter

from .common import declare, run_node

NODE_NAME = "recorder_node"

DEFAULT_TOPICS: tuple[str, ...] = (
    "/joint_states",
    "/effort_controller/commands",
    "/reference",
    "/adapter_node/latent",
    "/diagnostics",
    "/sim/true_task",
)
#: types of the default topics (what sim_node and adapter_node publish)
KNOWN_TYPES: dict[str, str] = {
    "/joint_states": "sensor_msgs/msg/JointState",
    "/reference": "sensor_msgs/msg/JointState",
    "/adapter_node/latent": "std_msgs/msg/Float64MultiArray",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    "/sim/true_task": "std_msgs/msg/String",
}
TIMESTAMP_MODES = ("receive", "node_clock")

# rclpy >= Iron passes MessageInfo (receive time, sequence numbers) to two-argument callbacks.
_HAS_MESSAGE_INFO = hasattr(Subscription, "CallbackType")


def default_bag_name(now: datetime | None = None) -> str:
    """``rosbag2_YYYY_MM_DD-HH_MM_SS``, as ``ros2 bag record`` names its bags."""
    return (now or datetime.now()).strftime("rosbag2_%Y_%m_%d-%H_%M_%S")


def message_class(msgtype: str) -> Any:
    """The Python class of ``pkg/msg/Name`` (needed for type support, even when raw)."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


class RecorderNode(Node):
    """See the module docstring. Extra keyword arguments go to :class:`rclpy.node.Node`."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        p = self._declare_parameters()
        topics = list(p["topics"])
        types = list(p["types"] or [])
        if types and len(types) != len(topics):
            raise ValueError(f"types has {len(types)} entries but topics has {len(topics)} "
                             "(give one type per topic, '' to discover it)")
        if len(set(topics)) != len(topics) or any(not t.startswith("/") for t in topics):
            raise ValueError(f"topics must be unique absolute names, got {topics}")
        self.wanted: dict[str, str] = {t: (types[i] if types else "") for i, t in
                                       enumerate(topics)}
        self.queue_depth = int(p["queue_depth"])
        self.timestamp_mode = p["timestamps"]
        output = Path(p["output"] or default_bag_name())
        self.writer = QueuedBagWriter(output, storage=p["storage"],
                                      version=p["version"] or None,
                                      flush_period_s=p["flush_period_s"])
        self.path = self.writer.path
        self._closing = threading.Event()
        self._recording: dict[str, Subscription] = {}
        self._skipped: set[str] = set()
        self.received: dict[str, int] = {}
        """messages taken from DDS per topic."""
        self.lost: dict[str, int] = {}
        """messages missing per topic (gaps in publishers' sequence numbers)."""
        self.dropped_after_close = 0
        self._last_sequence: dict[tuple[str, bytes], int] = {}
        self.context.on_shutdown(self.close)
        self._discover()
        self._discovery_timer = self.create_timer(
            float(p["discovery_period_s"]), self._discover,
            clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(
            f"recording {len(self.wanted)} topics to {self.path} ({self.writer.storage}, "
            f"rosbag2 version {self.writer.version}, flushed every "
            f"{self.writer.flush_period_s:g} s); timestamps: {self.timestamp_mode}")

    # ------------------------------------------------------------------ parameters

    def _declare_parameters(self) -> dict:
        d = {}
        d["output"] = declare(self, "output", "",
                              "Bag directory (must not exist); '' = rosbag2_<date-time> in the "
                              "working directory.")
        d["storage"] = declare(self, "storage", "mcap", "Storage format of the bag.",
                               choices=STORAGE_FORMATS)
        d["version"] = declare(self, "version", 0,
                               "rosbag2 metadata version: 0 = 9 for mcap, 8 for sqlite3 "
                               "(Humble plays version 8 sqlite3 bags).", low=0, high=9)
        d["topics"] = declare(self, "topics", list(DEFAULT_TOPICS), "Topics to record.",
                              param_type=Parameter.Type.STRING_ARRAY)
        d["types"] = declare(self, "types", None,
                             "Message type per topic (pkg/msg/Name), same order as topics; "
                             "unset or '' = discover from the graph.",
                             param_type=Parameter.Type.STRING_ARRAY)
        d["queue_depth"] = declare(self, "queue_depth", 1000,
                                   "History depth of each subscription.", low=1, high=100000)
        d["timestamps"] = declare(self, "timestamps", "receive",
                                  "Bag timestamps: receive time (system clock, as ros2 bag "
                                  "record) or the node clock (sim time with use_sim_time).",
                                  choices=TIMESTAMP_MODES)
        d["discovery_period_s"] = declare(self, "discovery_period_s", 0.1,
                                          "How often to look for publishers of missing topics.",
                                          low=0.01, high=60.0)
        d["flush_period_s"] = declare(self, "flush_period_s", 0.5,
                                      "How often the bag is flushed to disk (fsync): what a "
                                      "killed recorder or a power loss can lose, s.",
                                      low=0.05, high=60.0)
        return d

    # ------------------------------------------------------------------ discovery

    @property
    def subscribed_topics(self) -> list[str]:
        return sorted(self._recording)

    def _discover(self) -> None:
        missing = [t for t in self.wanted if t not in self._recording
                   and t not in self._skipped]
        if not missing or self._closing.is_set():
            if hasattr(self, "_discovery_timer"):
                self._discovery_timer.cancel()  # every topic is settled: stop polling
            return
        try:
            self._discover_topics(missing)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not stop the executor
            self.get_logger().error(f"topic discovery failed: {type(exc).__name__}: {exc}")

    def _discover_topics(self, missing: list[str]) -> None:
        graph_types = dict(self.get_topic_names_and_types())
        for topic in missing:
            publishers = self.get_publishers_info_by_topic(topic)
            if not publishers:
                continue
            msgtype = self.wanted[topic]
            if not msgtype:
                found = graph_types.get(topic, [])
                if len(found) != 1:
                    if len(found) > 1:
                        self.get_logger().error(f"{topic} has several types {found}; set its "
                                                "type in the types parameter")
                        self._skipped.add(topic)
                    continue
                msgtype = found[0]
            self._subscribe(topic, msgtype, publishers)

    def _subscribe(self, topic: str, msgtype: str, publishers: list) -> None:
        reliable = all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                       for p in publishers)
        latched = all(p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
                      for p in publishers)
        try:
            cls = message_class(msgtype)
            self.writer.add_topic(topic, msgtype, make_qos(reliable, latched,
                                                           publishers[0].qos_profile.depth))
        except (BagError, ImportError, AttributeError, ValueError) as exc:
            self.get_logger().error(f"not recording {topic}: {exc}")
            self._skipped.add(topic)
            return
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=self.queue_depth,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
        self.received[topic] = 0
        self.lost[topic] = 0
        self._recording[topic] = self.create_subscription(
            cls, topic, self._callback(topic), qos, raw=True)
        self.get_logger().info(
            f"recording {topic} ({msgtype}, {'reliable' if reliable else 'best effort'}"
            f"{', transient local' if latched else ''})")

    def _callback(self, topic: str) -> Callable:
        if _HAS_MESSAGE_INFO:
            def on_message(data: bytes, info: dict) -> None:
                self._on_message(topic, data, info)
        else:  # pragma: no cover - Humble: no MessageInfo
            def on_message(data: bytes) -> None:  # type: ignore[misc]
                self._on_message(topic, data, None)
        return on_message

    # ------------------------------------------------------------------ recording

    def _on_message(self, topic: str, data: bytes, info: dict | None) -> None:
        if self.timestamp_mode == "node_clock":
            stamp = self.get_clock().now().nanoseconds
        else:
            stamp = int(info.get("received_timestamp") or 0) if info else 0
            stamp = stamp or time.time_ns()
        self.received[topic] += 1
        if info:
            sequence = info.get("publication_sequence_number")
            gid = info.get("publisher_gid")
            if sequence and gid:
                key = (topic, bytes(gid.get("data", b"")))
                last = self._last_sequence.get(key)
                if last is not None and sequence > last + 1:
                    self.lost[topic] += sequence - last - 1
                self._last_sequence[key] = sequence
        if self._closing.is_set() or not self.writer.write(topic, stamp, data):
            self.dropped_after_close += 1

    def close(self) -> None:
        """Write everything queued, then close the bag. Idempotent, any thread."""
        self._closing.set()
        if not self.writer.close():
            return
        counts = ", ".join(f"{t} {n}" for t, n in sorted(self.writer.counts.items()))
        message = (f"closed {self.path}: {self.writer.message_count} messages "
                   f"({counts or 'no topics'})")
        lost = {t: n for t, n in self.lost.items() if n}
        if lost:
            message += (f"; {sum(lost.values())} lost before reaching the recorder (publisher "
                        "sequence gaps: " + ", ".join(f"{t} {n}" for t, n in lost.items()) + ")")
        if self.writer.write_error:
            message += f"; writing failed: {self.writer.write_error}"
        # after the context shut down (SIGINT, SIGTERM: this runs as its on_shutdown callback)
        # the node's logger would also publish to /rosout, which rcl refuses with an error
        # line; a child-named logger ("recorder_node.bag") that no node owns writes only to
        # the console and the log files
        logger = (self.get_logger() if self.context.ok()
                  else rclpy.logging.get_logger(f"{self.get_name()}.bag"))
        try:
            logger.info(message)
        except Exception:  # noqa: BLE001 - logging may be gone at interpreter exit
            print(message, flush=True)

    def destroy_node(self) -> None:
        if hasattr(self, "_closing"):  # not if the constructor failed before opening the bag
            self.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    # SIGINT and SIGTERM shut the context down (run_node); its on_shutdown closes the bag. No
    # bound on teardown: closing the bag (its last chunk, index and summary) must finish.
    return run_node(RecorderNode, args, teardown_timeout_s=None)


if __name__ == "__main__":
    raise SystemExit(main())
