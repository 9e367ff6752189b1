"""Effort commands serialized by hand, for rclpy to publish as bytes.

rclpy publishes a message object by converting it, field by field, into its C message and
serializing that; ``Publisher.publish`` of a ``bytes`` object hands the bytes to the middleware
as they are. For the seven float64 of an effort command the conversion costs more than the
tick's arithmetic, so :class:`Float64ArrayEncoder` writes the CDR bytes of a
``std_msgs/msg/Float64MultiArray`` in one :meth:`struct.Struct.pack` call.

Layout (plain little-endian CDR, as every ROS 2 middleware serializes; alignment relative to
the end of the 4-byte encapsulation header; padding zeros):

* encapsulation ``00 01 00 00`` (CDR_LE),
* ``layout.dim``: uint32 count, then per dimension the label (uint32 length with the
  terminating NUL, the bytes, NUL), 4-aligned uint32 ``size`` and ``stride``,
* ``layout.data_offset`` uint32,
* ``data``: uint32 count, 8-aligned float64 values.

The command carries at most one dimension (the lockstep tag, :mod:`metarl_ros.nodes.commands`).
Pure Python (no ROS), so it is tested against rclpy's own serializer.
"""

from __future__ import annotations

import struct

import numpy as np

_ENCAPSULATION = b"\x00\x01\x00\x00"
_HEADER = 4


def _padding(offset: int, size: int) -> int:
    """Bytes to insert at absolute ``offset`` to align to ``size`` after the header."""
    return -(offset - _HEADER) % size


class Float64ArrayEncoder:
    """CDR bytes of ``std_msgs/msg/Float64MultiArray`` with ``n`` float64 values and at most
    one layout dimension (``size`` = ``stride`` = ``n``, ``data_offset`` 0).

    Args:
        n: values per message.
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self._untagged = struct.Struct(self._format(None))
        self._tagged: dict[int, struct.Struct] = {}  # by label length (the format depends on it)

    def _format(self, label_length: int | None) -> str:
        """The struct format of a message whose one dimension's label has ``label_length``
        bytes (None: no dimension)."""
        fmt, offset = "<4sI", _HEADER + 4
        if label_length is not None:
            text = label_length + 1  # with its NUL (struct pads an "s" field with zeros)
            pad = _padding(offset + 4 + text, 4)
            fmt += f"I{text + pad}sII"
            offset += 4 + text + pad + 8
        fmt += "II"  # data_offset, data count
        offset += 8
        return fmt + f"{_padding(offset, 8)}x{8 * self.n}s"  # aligned even when empty

    def encode(self, values: np.ndarray, label: str | None = None) -> bytes:
        """The message with ``values`` (n,) as ``data`` (as float64) and, with ``label``, one
        dimension labelled so (ASCII). Raises ``ValueError`` on a wrong number of values."""
        data = np.ascontiguousarray(values, dtype=np.float64)
        if data.shape != (self.n,):
            raise ValueError(f"{data.shape} values, expected ({self.n},)")
        n = self.n
        if label is None:
            return self._untagged.pack(_ENCAPSULATION, 0, 0, n, data.tobytes())
        text = label.encode("ascii")
        packer = self._tagged.get(len(text))
        if packer is None:
            packer = self._tagged[len(text)] = struct.Struct(self._format(len(text)))
        return packer.pack(_ENCAPSULATION, 1, len(text) + 1, text, n, n, 0, n, data.tobytes())
