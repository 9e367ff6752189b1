"""Read what a killed writer left in an MCAP file: every complete record up to the cut.

The file is walked record by record from the start (no summary, footer or index needed):
Schema and Channel records are collected, Message records -- at the top level or inside
chunks -- are yielded in file order. The walk ends at the end of the data section, or at the
first record that does not fit in the file (the cut) or does not parse (garbage, e.g. blocks
a power loss left as zeros). A chunk whose CRC does not match is skipped whole; of a chunk
cut short, the complete messages before the cut are kept (uncompressed chunks). Chunks
compressed with zstd or lz4 are read when the library is installed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from metarl_ros.recording.formats import BagError
from metarl_ros.recording.mcap_storage import (
    MAGIC,
    OP_CHANNEL,
    OP_CHUNK,
    OP_DATA_END,
    OP_FOOTER,
    OP_HEADER,
    OP_MESSAGE,
    OP_SCHEMA,
)

_RECORD = struct.Struct("<BQ")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_MESSAGE = struct.Struct("<HIQQ")
_CHUNK = struct.Struct("<QQQI")


@dataclass(frozen=True)
class Topic:
    """A channel of the file with what a rosbag2 writer needs to register it again."""

    id: int
    topic: str
    msgtype: str
    encoding: str  # of the definition: ros2msg | ros2idl
    msgdef: str
    serialization_format: str
    offered_qos_profiles: str
    type_hash: str


@dataclass
class SalvageReport:
    """What the walk found: where the good data ends and what it skipped."""

    path: Path
    size: int
    good_bytes: int = 0
    complete: bool = False
    """the walk reached Data End (the writer closed the file)."""
    messages: int = 0
    skipped_chunks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def lost_bytes(self) -> int:
        return self.size - self.good_bytes

    @classmethod
    def start(cls, path: Path) -> SalvageReport:
        """An empty report on the file ``path``; :class:`BagError` if it cannot be read or is
        empty."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BagError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if size == 0:
            raise BagError(f"{path}: empty file (0 bytes): the recorder was stopped before "
                           "anything reached the disk; nothing to recover")
        return cls(path, size)


def _string(buf, pos: int) -> tuple[str, int]:
    (length,) = _U32.unpack_from(buf, pos)
    end = pos + 4 + length
    if end > len(buf):
        raise ValueError("string runs past its record")
    return bytes(buf[pos + 4:end]).decode("utf-8"), end


def _string_map(buf, pos: int) -> tuple[dict[str, str], int]:
    (length,) = _U32.unpack_from(buf, pos)
    end, pos, items = pos + 4 + length, pos + 4, {}
    while pos < end:
        key, pos = _string(buf, pos)
        items[key], pos = _string(buf, pos)
    return items, end


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
        except ImportError:
            from backports import zstd  # type: ignore[no-redef]  # rosbags' dependency
        return zstd.decompress(data)
    if compression == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    raise ValueError(f"unknown chunk compression {compression!r}")


class McapSalvage:
    """Walk ``path``; :meth:`messages` yields ``(topic, log_time_ns, data)``; the topics
    (:attr:`topics`, channel id -> :class:`Topic`) are known before their first message."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.topics: dict[int, Topic] = {}
        self._schemas: dict[int, tuple[str, str, str]] = {}
        self._pending_channels: dict[int, tuple] = {}
        self.report = SalvageReport.start(self.path)

    def messages(self) -> Iterator[tuple[Topic, int, bytes]]:
        try:
            with open(self.path, "rb") as stream:
                if stream.read(len(MAGIC)) != MAGIC:
                    raise BagError(f"{self.path}: not an MCAP file (bad magic)")
                yield from self._walk(stream)
        except OSError as exc:
            raise BagError(f"{self.path}: cannot read: {exc.strerror or exc}") from None

    def _walk(self, stream) -> Iterator[tuple[Topic, int, bytes]]:
        report = self.report
        pos = report.good_bytes = len(MAGIC)
        try:
            while pos + 9 <= report.size:
                op, length = _RECORD.unpack(stream.read(9))
                end = pos + 9 + length
                if op == 0:
                    report.problems.append(f"invalid record at byte {pos} (zeros?): stopped")
                    return
                if end > report.size:
                    if op == OP_CHUNK:
                        rest = memoryview(stream.read(report.size - pos - 9))
                        yield from self._chunk(rest, partial=True, at=pos)
                    return  # the cut: the normal end of a killed recording
                body = memoryview(stream.read(length))
                if op == OP_CHUNK:
                    yield from self._chunk(body, partial=False, at=pos)
                elif op in (OP_DATA_END, OP_FOOTER):
                    report.complete = True
                    report.good_bytes = report.size
                    return
                elif op == OP_HEADER:
                    profile, _ = _string(body, 0)
                    if profile != "ros2":
                        raise BagError(f"{self.path}: MCAP profile {profile!r}, not a ros2 bag")
                else:
                    yield from self._record(op, body)
                pos = report.good_bytes = end
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, BagError):
                raise
            report.problems.append(f"unreadable record at byte {pos} ({exc}): stopped")

    def _record(self, op: int, body: memoryview) -> Iterator[tuple[Topic, int, bytes]]:
        if op == OP_MESSAGE:
            cid, _, log_time, _ = _MESSAGE.unpack_from(body, 0)
            topic = self.topics.get(cid)
            if topic is None:
                raise ValueError(f"message on undeclared channel {cid}")
            self.report.messages += 1
            yield topic, log_time, bytes(body[_MESSAGE.size:])
        elif op == OP_SCHEMA:
            (sid,) = _U16.unpack_from(body, 0)
            name, pos = _string(body, 2)
            encoding, pos = _string(body, pos)
            (length,) = _U32.unpack_from(body, pos)
            msgdef = bytes(body[pos + 4:pos + 4 + length]).decode("utf-8")
            self._schemas[sid] = (name, encoding, msgdef)
        elif op == OP_CHANNEL:
            cid, sid = struct.unpack_from("<HH", body, 0)
            name, pos = _string(body, 4)
            encoding, pos = _string(body, pos)
            metadata, _ = _string_map(body, pos)
            msgtype, def_encoding, msgdef = self._schemas.get(sid, ("", "ros2msg", ""))
            if not msgtype:
                raise ValueError(f"channel {name} without a schema")
            self.topics.setdefault(cid, Topic(
                cid, name, msgtype, def_encoding, msgdef, encoding,
                metadata.get("offered_qos_profiles", ""), metadata.get("topic_type_hash", "")))

    def _chunk(self, body: memoryview, partial: bool,
               at: int) -> Iterator[tuple[Topic, int, bytes]]:
        report = self.report
        _, _, size, crc = _CHUNK.unpack_from(body, 0)
        compression, pos = _string(body, _CHUNK.size)
        (stored,) = struct.unpack_from("<Q", body, pos)
        records = body[pos + 8:pos + 8 + stored]
        if partial:
            if compression:
                return  # a cut compressed chunk cannot be decoded
        else:
            try:
                records = memoryview(_decompress(bytes(records), compression, size))
            except Exception as exc:  # noqa: BLE001 - a chunk we cannot decode is skipped
                report.skipped_chunks += 1
                report.problems.append(f"chunk at byte {at}: {exc}: skipped")
                return
            if crc and zlib.crc32(records) != crc:
                report.skipped_chunks += 1
                report.problems.append(f"chunk at byte {at}: CRC mismatch: skipped")
                return
        inner, first = 0, at + 9 + pos + 8  # file offset of the chunk's first record
        while inner + 9 <= len(records):
            op, length = _RECORD.unpack_from(records, inner)
            end = inner + 9 + length
            if op == 0 or end > len(records):
                return
            yield from self._record(op, records[inner + 9:end])
            inner = end
            if partial:
                report.good_bytes = first + inner
