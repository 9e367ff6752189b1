"""Fast CDR decoding of the two types that make up almost all of a recording.

Hand-written little-endian CDR readers for ``sensor_msgs/msg/JointState``
(:class:`JointStateDecoder`, :class:`JointStateColumns`) and ``std_msgs/msg/Float64MultiArray``
(:class:`Float64ArrayDecoder`), several times faster than a generic deserializer. They check
the layout as they go and raise :class:`CdrLayoutError` on anything unexpected (big-endian
data, an ambiguous empty array, a size that does not add up); callers then fall back to
``rosbags``' deserializer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_U32 = struct.Struct("<I")
_STAMP_LEN = struct.Struct("<iII")
_3U32 = struct.Struct("<III")
HEADER_SIZE = 4  # CDR encapsulation header; alignment is relative to what follows it


class CdrLayoutError(ValueError):
    """The bytes are not the plain little-endian CDR layout the fast decoder handles."""


@dataclass(frozen=True)
class JointStateLayout:
    """What varies between JointState messages of one publisher: names and array sizes."""

    names: tuple[str, ...]
    n_position: int
    n_velocity: int
    n_effort: int

    @property
    def record_size(self) -> int:
        """Length of a decoded record: three length fields and the values."""
        return self.n_position + self.n_velocity + self.n_effort + 3

    def split(self, records):
        """Records ``(n_p, *position, n_v, *velocity, n_e, *effort)`` along the last axis
        (a tuple, or an array of shape (..., record_size)) -> position, velocity, effort."""
        a = 1 + self.n_position
        b = a + 1 + self.n_velocity
        return records[..., 1:a], records[..., a + 1:b], records[..., b + 1:]


def _check_encapsulation(raw: bytes | memoryview) -> None:
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 1:  # CDR_LE
        raise CdrLayoutError("not little-endian plain CDR")


def align(pos: int, size: int) -> int:
    """Absolute offset ``pos`` aligned to ``size`` relative to the data after the header
    (CDR's rule; also what :mod:`metarl_ros.nodes.command_cdr` writes by)."""
    return pos + (HEADER_SIZE - pos) % size


def _string_end(raw: bytes | memoryview, pos: int) -> int:
    """Offset after the string whose (4-aligned) length field is at ``pos``."""
    (length,) = _U32.unpack_from(raw, pos)
    end = pos + 4 + length
    if length == 0 or end > len(raw):
        raise CdrLayoutError("bad string length")
    return end


def _float64_sequences(raw: bytes | memoryview, pos: int,
                       count: int) -> tuple[list[int], int, str, list[tuple[int, int]]]:
    """Walk ``count`` consecutive ``float64[]`` fields starting at ``pos``.

    Returns their sizes, the end offset, a :mod:`struct` format that unpacks all of them
    (length fields and values, with explicit padding) from ``pos``, and per field the absolute
    offsets of its length and of its first value. An empty sequence is ambiguous between
    serializers (fastcdr pads to 8 for it, others do not), so it is only accepted as the last
    field.
    """
    sizes, fmt, offsets = [], "<", []
    for i in range(count):
        aligned = align(pos, 4)
        fmt += "x" * (aligned - pos) + "I"
        (size,) = _U32.unpack_from(raw, aligned)
        count_at = aligned
        pos = aligned + 4
        if size == 0:
            if i != count - 1 and (pos - HEADER_SIZE) % 8:
                raise CdrLayoutError("empty float64 sequence with ambiguous padding")
        else:
            aligned = align(pos, 8)
            fmt += "x" * (aligned - pos) + f"{size}d"
            pos = aligned + 8 * size
        if pos > len(raw):
            raise CdrLayoutError("float64 sequence runs past the end")
        sizes.append(size)
        offsets.append((count_at, pos - 8 * size))
    return sizes, pos, fmt, offsets


class JointStateDecoder:
    """Decode ``sensor_msgs/msg/JointState`` CDR bytes.

    A driver sends the same names and array sizes in every message, so the first message of a
    layout is parsed field by field and the rest with one precompiled :class:`struct.Struct`
    call after a byte comparison of the name block.

    Args:
        max_names: a message announcing more joint names than this is refused
            (:class:`CdrLayoutError`) before any name is read; None: no bound.
    """

    def __init__(self, max_names: int | None = None) -> None:
        self.max_names = max_names
        self._start = -1
        self._block = b""
        self._layout: JointStateLayout | None = None
        self._struct: struct.Struct | None = None
        self._count_index: tuple[int, int, int] = (0, 0, 0)

    def decode(self, raw: bytes | memoryview) -> tuple[int, JointStateLayout, tuple]:
        """Return ``(stamp_ns, layout, record)``.

        ``record`` is ``(n_p, *position, n_v, *velocity, n_e, *effort)`` -- the arrays with
        their length fields, as one :mod:`struct` call yields them (:meth:`JointStateLayout.
        split` takes them apart, also for many records at once). Raises
        :class:`CdrLayoutError` if the bytes are not a plain little-endian JointState.
        """
        if not isinstance(raw, bytes):
            raw = bytes(raw)
        if len(raw) < 16 or raw[0] != 0 or raw[1] != 1:
            raise CdrLayoutError("not little-endian plain CDR")
        sec, nanosec, frame_len = _STAMP_LEN.unpack_from(raw, 4)
        start = align(16 + frame_len, 4)
        if start == self._start and self._struct is not None and \
                raw.startswith(self._block, start):
            offset = start + len(self._block)
            rest = len(raw) - offset - self._struct.size
            if 0 <= rest <= 7:
                fields = self._struct.unpack_from(raw, offset)
                i, j, k = self._count_index
                layout = self._layout
                assert layout is not None
                if (fields[i] == layout.n_position and fields[j] == layout.n_velocity
                        and fields[k] == layout.n_effort):
                    return sec * 1_000_000_000 + nanosec, layout, fields
        return self.parse(raw)

    def parse(self, raw: bytes) -> tuple[int, JointStateLayout, tuple]:
        """Like :meth:`decode`, field by field; remembers the layout for the fast paths."""
        try:
            _check_encapsulation(raw)
            sec, nanosec, frame_len = _STAMP_LEN.unpack_from(raw, 4)
            return self._parse(raw, sec * 1_000_000_000 + nanosec, align(16 + frame_len, 4))
        except (struct.error, UnicodeDecodeError):
            raise CdrLayoutError("not a plain little-endian JointState") from None

    def _parse(self, raw: bytes, stamp_ns: int, start: int):
        if start > len(raw):
            raise CdrLayoutError("bad frame_id length")
        (count,) = _U32.unpack_from(raw, start)
        if self.max_names is not None and count > self.max_names:
            raise CdrLayoutError(f"{count} joint names, more than {self.max_names}")
        pos, names = start + 4, []
        for _ in range(count):
            pos = align(pos, 4)
            end = _string_end(raw, pos)
            names.append(bytes(raw[pos + 4:end - 1]).decode("utf-8"))
            pos = end
        sizes, end, fmt, offsets = _float64_sequences(raw, pos, 3)
        if len(raw) - end > 7:
            raise CdrLayoutError("trailing bytes after JointState")
        layout = JointStateLayout(tuple(names), *sizes)
        fields = struct.unpack_from(fmt, raw, pos)
        i = 0
        j = i + 1 + sizes[0]
        k = j + 1 + sizes[1]
        # the fast path for the next messages: same name block at the same offset
        self._start, self._block = start, bytes(raw[start:pos])
        self._layout, self._struct = layout, struct.Struct(fmt)
        self._count_index = (i, j, k)
        # ... and, for JointStateColumns, the whole message as a numpy record
        names_, formats, places = ["sec", "nanosec"], ["<i4", "<u4"], [4, 8]
        for f, (size, (count_at, data_at)) in enumerate(zip(sizes, offsets)):
            names_.append(f"n{f}")
            formats.append("<u4")
            places.append(count_at)
            if size:
                names_.append(f"v{f}")
                formats.append(("<f8", (size,)))
                places.append(data_at)
        self.record_dtype = np.dtype({"names": names_, "formats": formats, "offsets": places,
                                      "itemsize": len(raw)})
        """numpy dtype of a whole message of the last parsed layout (this byte size)."""
        return stamp_ns, layout, fields

    def __call__(self, raw: bytes | memoryview) -> "JointStateData":
        stamp, layout, record = self.decode(raw)
        position, velocity, effort = layout.split(np.asarray(record, dtype=np.float64))
        return JointStateData(stamp, layout.names, position, velocity, effort)


@dataclass
class _Run:
    """Consecutive messages of one layout: raw bytes (one numpy record each) or records."""

    layout: JointStateLayout
    dtype: np.dtype | None
    chunks: list


class JointStateColumns:
    """Collect ``sensor_msgs/msg/JointState`` messages, decode them column-wise at the end.

    A message with the byte size, ``frame_id`` length and name block of the one before (three
    comparisons, no parsing) joins the current run as raw bytes; any other message is parsed
    field by field (:class:`JointStateDecoder`) and starts a run. :meth:`runs` views each run's
    bytes as one numpy record array, so a long recording costs a list append per message.

    Args:
        fallback: ``fallback(raw) -> (stamp_ns, layout, record)`` for messages the decoder
            refuses (:class:`CdrLayoutError`), e.g. a generic deserializer; without it such a
            message raises.
    """

    def __init__(self, fallback=None) -> None:
        self._decoder = JointStateDecoder()
        self._fallback = fallback
        self._runs: list[_Run] = []
        self._size = -1
        self._frame = b""
        self._start = 0
        self._block = b""
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, raw: bytes | memoryview) -> None:
        if not isinstance(raw, bytes):
            raw = bytes(raw)
        if (len(raw) == self._size and raw[1] == 1 and raw[0] == 0
                and raw[12:16] == self._frame and raw.startswith(self._block, self._start)):
            self._runs[-1].chunks.append(raw)
            self.count += 1
            return
        try:
            self._decoder.parse(raw)
        except CdrLayoutError:
            if self._fallback is None:
                raise CdrLayoutError("not a plain little-endian JointState") from None
            stamp, layout, record = self._fallback(raw)
            self._size = -1
            last = self._runs[-1] if self._runs else None
            if last is None or last.dtype is not None or last.layout != layout:
                last = _Run(layout, None, [])
                self._runs.append(last)
            last.chunks.append((stamp, record))
            self.count += 1
            return
        decoder = self._decoder
        assert decoder._layout is not None
        self._size, self._frame = len(raw), raw[12:16]
        self._start, self._block = decoder._start, decoder._block
        self._runs.append(_Run(decoder._layout, decoder.record_dtype, [raw]))
        self.count += 1

    def runs(self):
        """Per run, in order: ``(layout, stamp_ns (m,), position, velocity, effort)``; the
        arrays have shape (m, size) in the message's joint order."""
        for run in self._runs:
            layout = run.layout
            if run.dtype is None:
                stamps = np.asarray([c[0] for c in run.chunks], dtype=np.int64)
                records = np.asarray([c[1] for c in run.chunks], dtype=np.float64)
                yield (layout, stamps, *layout.split(records))
                continue
            data = np.frombuffer(b"".join(run.chunks), dtype=run.dtype)
            sizes = (layout.n_position, layout.n_velocity, layout.n_effort)
            if not all((data[f"n{f}"] == size).all() for f, size in enumerate(sizes)):
                # same bytes up to the arrays but other sizes: parse one by one (never seen)
                for raw in run.chunks:
                    stamp, one, record = JointStateDecoder().decode(raw)
                    yield (one, np.asarray([stamp], dtype=np.int64),
                           *one.split(np.asarray([record], dtype=np.float64)))
                continue
            stamps = data["sec"].astype(np.int64) * 1_000_000_000 + data["nanosec"]
            arrays = [data[f"v{f}"] if size else np.zeros((len(data), 0))
                      for f, size in enumerate(sizes)]
            yield (layout, stamps, *(np.array(a, dtype=np.float64) for a in arrays))


@dataclass(frozen=True)
class JointStateData:
    """A decoded ``sensor_msgs/JointState``: stamp (ns) and arrays of shape (len(names),)."""

    stamp_ns: int
    names: tuple[str, ...]
    position: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray


def decode_joint_state(raw: bytes | memoryview) -> JointStateData:
    """One-off :class:`JointStateDecoder` call (keep a decoder to reuse its layout cache)."""
    return JointStateDecoder()(raw)


class Float64ArrayDecoder:
    """``data`` of ``std_msgs/msg/Float64MultiArray`` CDR bytes, as a tuple of floats.

    The common case -- no layout dimensions -- is one :class:`struct.Struct` call.
    """

    def __init__(self) -> None:
        self._structs: dict[int, struct.Struct] = {}

    def __call__(self, raw: bytes | memoryview) -> tuple[float, ...]:
        if len(raw) >= 16 and raw[0] == 0 and raw[1] == 1:
            dims, _, count = _3U32.unpack_from(raw, 4)
            if dims == 0:
                if count == 0:
                    return ()
                packer = self._structs.get(count)
                if packer is None:
                    packer = self._structs[count] = struct.Struct(f"<{count}d")
                if 0 <= len(raw) - 20 - packer.size <= 7:
                    return packer.unpack_from(raw, 20)
        return self._slow(raw)

    @staticmethod
    def _slow(raw: bytes | memoryview) -> tuple[float, ...]:
        _check_encapsulation(raw)
        (dims,) = _U32.unpack_from(raw, 4)
        pos = 8
        for _ in range(dims):  # MultiArrayDimension: label, size, stride
            pos = align(_string_end(raw, align(pos, 4)), 4) + 8
        pos = align(pos, 4) + 4  # data_offset
        _, end, fmt, _ = _float64_sequences(raw, pos, 1)
        if len(raw) - end > 7:
            raise CdrLayoutError("trailing bytes after Float64MultiArray")
        return struct.unpack_from(fmt, raw, pos)[1:]


def decode_float64_array(raw: bytes | memoryview) -> np.ndarray:
    """``data`` of a ``std_msgs/msg/Float64MultiArray`` (the layout is skipped), shape (N,)."""
    return np.asarray(Float64ArrayDecoder()(raw), dtype=np.float64)
