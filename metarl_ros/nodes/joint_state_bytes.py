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

import struct
from typing import NamedTuple, Sequence

import numpy as np
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import JointState

from metarl_ros.recording.cdr import CdrLayoutError, JointStateDecoder

from .common import stamp_to_s

_NAMES_AT = struct.Struct("<III")  # stamp sec, nanosec, frame_id length (after the header)


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
        self.max_names = max_names
        self._decoder = JointStateDecoder()

    def read(self, raw: bytes) -> JointStateFields:
        """The fields of one message. Raises what rclpy's deserializer raises on bytes that
        are not a JointState at all."""
        try:
            if self._names(raw) <= self.max_names:
                stamp_ns, layout, record = self._decoder.decode(raw)
                sec, nanosec = divmod(stamp_ns, 1_000_000_000)
                values = np.asarray(record, dtype=np.float64)
                position, velocity, effort = layout.split(values)
                return JointStateFields(sec + nanosec * 1e-9, layout.names, position, velocity,
                                        effort)
        except (CdrLayoutError, struct.error):
            pass
        msg = deserialize_message(raw, JointState)
        return JointStateFields(stamp_to_s(msg.header.stamp), msg.name, msg.position,
                                msg.velocity, msg.effort)

    @staticmethod
    def _names(raw: bytes) -> int:
        """The number of joint names the bytes announce (little-endian CDR)."""
        _, _, frame = _NAMES_AT.unpack_from(raw, 4)
        start = 16 + frame
        start += -(start - 4) % 4
        (count,) = struct.unpack_from("<I", raw, start)
        return count
