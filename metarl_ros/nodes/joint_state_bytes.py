"""Joint states read from their CDR bytes, for a subscription that takes messages raw.

rclpy turns each received ``sensor_msgs/JointState`` into a Python message -- a header, a
string per joint name, three ``array('d')`` -- before the callback runs; on the control tick's
path that costs more than the tick's arithmetic. A subscription created with ``raw=True``
hands over the serialized bytes instead, and :class:`JointStateReader` reads the fields the
control loop needs with :class:`~metarl_ros.recording.cdr.JointStateDecoder` (one
``struct`` call once a publisher's layout is known). Bytes it does not handle (big-endian
data, an unusual layout) go through rclpy's own deserializer, as do messages with more joint
names than the loop accepts: those are read as rclpy would have, then refused by the loop on
their length (parsing a million names in Python here would take longer).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import JointState

from metarl_ros.recording.cdr import CdrLayoutError, JointStateDecoder

from .common import stamp_to_s


class JointStateFields(NamedTuple):
    """What the control loop reads of a joint state: the stamp (s, as
    :func:`~metarl_ros.nodes.common.stamp_to_s`), names, and the arrays (n,) each (``effort``
    may be empty)."""

    stamp_s: float
    names: Sequence[str]
    position: Sequence[float]
    velocity: Sequence[float]
    effort: Sequence[float]


class JointStateReader:
    """Read ``sensor_msgs/msg/JointState`` CDR bytes (module doc).

    Args:
        max_names: messages with more joint names than this are left to rclpy's deserializer
            (the loop refuses them).
    """

    def __init__(self, max_names: int) -> None:
        self._decoder = JointStateDecoder(max_names)

    def read(self, raw: bytes) -> JointStateFields:
        """The fields of one message. Raises what rclpy's deserializer raises on bytes that
        are not a JointState at all."""
        try:
            stamp_ns, layout, record = self._decoder.decode(raw)
        except CdrLayoutError:
            msg = deserialize_message(raw, JointState)
            return JointStateFields(stamp_to_s(msg.header.stamp), msg.name, msg.position,
                                    msg.velocity, msg.effort)
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        position, velocity, effort = layout.split(np.asarray(record, dtype=np.float64))
        return JointStateFields(sec + nanosec * 1e-9, layout.names, position, velocity, effort)
