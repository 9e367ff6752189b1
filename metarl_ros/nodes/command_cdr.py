"""Commands serialized by hand, for rclpy to publish as bytes.

rclpy publishes a message object by converting it, field by field, into its C message and
serializing that; ``Publisher.publish`` of a ``bytes`` object hands the bytes to the middleware
as they are. For the few float64 of a command the conversion costs more than the tick's
arithmetic, so the encoders here write a command's CDR bytes in one
:meth:`struct.Struct.pack` call:

* :class:`Float64ArrayEncoder` -- ``std_msgs/msg/Float64MultiArray`` (``effort`` commands);
* :class:`OnePointTrajectoryEncoder` -- ``trajectory_msgs/msg/JointTrajectory`` with one point
  whose four arrays are all filled (``impedance`` commands).

Plain little-endian CDR, as every ROS 2 middleware serializes: an encapsulation header ``00 01
00 00`` (CDR_LE), then the fields in order -- integers at their natural alignment, strings as a
uint32 length (with the terminating NUL), the bytes and the NUL, sequences as a uint32 count
then the elements, float64 elements 8-aligned -- with alignment relative to the end of the
header and zero padding. Only layouts without empty sequences are written: serializers differ
on the padding of an empty float64 sequence. Pure Python (no ROS), tested against rclpy's
serializer.
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np

from metarl_ros.recording.cdr import HEADER_SIZE, align

_ENCAPSULATION = b"\x00\x01\x00\x00"


class _Layout:
    """A :mod:`struct` format built field by field, tracking CDR alignment."""

    def __init__(self) -> None:
        self.format = "<4s"  # the encapsulation header
        self.offset = HEADER_SIZE

    def _align(self, size: int) -> None:
        pad = align(self.offset, size) - self.offset
        if pad:
            self.format += f"{pad}x"
            self.offset += pad

    def uint32(self) -> None:
        self._align(4)
        self.format += "I"
        self.offset += 4

    def int32(self) -> None:
        self._align(4)
        self.format += "i"
        self.offset += 4

    def string(self, length: int) -> None:
        """A string of ``length`` bytes: its length field, then the bytes and the NUL (one
        ``s`` field, which struct pads with zeros)."""
        self.uint32()
        self.format += f"{length + 1}s"
        self.offset += length + 1

    def float64s(self, n: int) -> None:
        """A float64 sequence of ``n`` > 0 values: its count, then the values as one ``s``
        field (their bytes)."""
        if n <= 0:
            raise ValueError("empty float64 sequences are not written (padding differs)")
        self.uint32()
        self._align(8)
        self.format += f"{8 * n}s"
        self.offset += 8 * n

    def struct(self) -> struct.Struct:
        return struct.Struct(self.format)


def _float64_bytes(values: np.ndarray, n: int) -> bytes:
    data = np.ascontiguousarray(values, dtype=np.float64)
    if data.shape != (n,):
        raise ValueError(f"{data.shape} values, expected ({n},)")
    return data.tobytes()


class Float64ArrayEncoder:
    """CDR bytes of ``std_msgs/msg/Float64MultiArray`` with ``n`` float64 values and at most
    one layout dimension (``size`` = ``stride`` = ``n``, ``data_offset`` 0).

    Args:
        n: values per message (> 0).
    """

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        self.n = n
        self._untagged = self._layout(None)
        self._tagged: dict[int, struct.Struct] = {}  # by label length (the format depends on it)

    def _layout(self, label_length: int | None) -> struct.Struct:
        """The format of a message whose one dimension's label has ``label_length`` bytes
        (None: no dimension)."""
        layout = _Layout()
        layout.uint32()  # layout.dim count
        if label_length is not None:
            layout.string(label_length)
            layout.uint32()  # size
            layout.uint32()  # stride
        layout.uint32()  # data_offset
        layout.float64s(self.n)
        return layout.struct()

    def encode(self, values: np.ndarray, label: str | None = None) -> bytes:
        """The message with ``values`` (n,) as ``data`` (as float64) and, with ``label``, one
        dimension labelled so. Raises ``ValueError`` on a wrong number of values."""
        data = _float64_bytes(values, self.n)
        n = self.n
        if label is None:
            return self._untagged.pack(_ENCAPSULATION, 0, 0, n, data)
        text = label.encode("utf-8")
        packer = self._tagged.get(len(text))
        if packer is None:
            packer = self._tagged[len(text)] = self._layout(len(text))
        return packer.pack(_ENCAPSULATION, 1, len(text) + 1, text, n, n, 0, n, data)


class OnePointTrajectoryEncoder:
    """CDR bytes of ``trajectory_msgs/msg/JointTrajectory`` with a zero header stamp, an empty
    ``frame_id``, fixed ``joint_names`` and one point whose ``positions``, ``velocities``,
    ``accelerations`` and ``effort`` each have one value per joint, reached at a fixed
    ``time_from_start``.

    Args:
        joint_names: the trajectory's joints.
        time_from_start: ``(sec, nanosec)`` of the point.
    """

    def __init__(self, joint_names: Sequence[str], time_from_start: tuple[int, int]) -> None:
        names = [name.encode("utf-8") for name in joint_names]
        if not names:
            raise ValueError("a trajectory needs joint names")
        self.n = len(names)
        layout = _Layout()
        layout.int32()  # header.stamp.sec
        layout.uint32()  # header.stamp.nanosec
        layout.string(0)  # header.frame_id
        layout.uint32()  # joint_names count
        for name in names:
            layout.string(len(name))
        layout.uint32()  # points count
        for _ in range(4):
            layout.float64s(self.n)
        layout.int32()  # time_from_start.sec
        layout.uint32()  # time_from_start.nanosec
        self._struct = layout.struct()
        self._head = (_ENCAPSULATION, 0, 0, 1, b"", len(names),
                      *(part for name in names for part in (len(name) + 1, name)), 1)
        self._time = tuple(time_from_start)

    def encode(self, positions: np.ndarray, velocities: np.ndarray,
               accelerations: np.ndarray, effort: np.ndarray) -> bytes:
        """The trajectory with these (n,) arrays (as float64) in its point. Raises
        ``ValueError`` on a wrong number of values."""
        n = self.n
        return self._struct.pack(
            *self._head,
            n, _float64_bytes(positions, n), n, _float64_bytes(velocities, n),
            n, _float64_bytes(accelerations, n), n, _float64_bytes(effort, n), *self._time)
