"""MCAP storage for rosbag2 bags that loses at most the last moments when its writer is killed.

A storage plugin for ``rosbags``' :class:`~rosbags.rosbag2.Writer` (the same five calls as
its own MCAP storage) that writes the file from the MCAP specification (https://mcap.dev/spec)
with the rosbag2 profile:

* the header, then each Schema and Channel record at the top level of the data section, before
  the first message that uses it -- a file cut anywhere still declares every channel it holds;
* messages go into chunks (uncompressed, with their CRC-32) followed by their Message Index
  records; a chunk is closed when it reaches :data:`CHUNK_SIZE` bytes and whenever
  :meth:`McapStorage.flush` is called -- the bag writer does that on a timer, and flush also
  hands everything to the disk (``fsync``). What a SIGKILL or a power loss takes is therefore
  the open chunk: the messages since the last flush;
* the channels carry rosbag2's metadata (``offered_qos_profiles``, ``topic_type_hash``), so a
  file without its summary still says everything needed to rebuild the bag
  (:mod:`~metarl_ros.recording.mcap_salvage`);
* :meth:`McapStorage.close` appends the ``rosbag2`` Metadata record, Data End, the summary
  (schemas, channels, chunk indexes, metadata index, statistics, summary offsets) and the
  footer: an indexed file as ``ros2 bag record`` writes one.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

from metarl_ros.recording.formats import BagError

MAGIC = b"\x89MCAP0\r\n"
OP_HEADER, OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK = 1, 2, 3, 4, 5, 6
OP_MESSAGE_INDEX, OP_CHUNK_INDEX, OP_STATISTICS, OP_METADATA = 7, 8, 11, 12
OP_METADATA_INDEX, OP_SUMMARY_OFFSET, OP_DATA_END = 13, 14, 15
#: a chunk is closed once its records reach this many bytes (1 MiB, as rosbag2 and rosbags)
CHUNK_SIZE = 1 << 20

_RECORD = struct.Struct("<BQ")
_MESSAGE = struct.Struct("<BQHIQQ")  # record head + channel, sequence, log and publish time
_MESSAGE_FIELDS = 22  # channel id .. publish time


def record(op: int, body: bytes) -> bytes:
    """One MCAP record: opcode, length, body."""
    return _RECORD.pack(op, len(body)) + body


def string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def string_map(items: dict[str, str]) -> bytes:
    body = b"".join(string(k) + string(v) for k, v in items.items())
    return struct.pack("<I", len(body)) + body


def fsync_directory(path: Path) -> None:
    """Make a new or renamed entry of ``path`` durable (no-op where directories can't sync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class McapStorage:
    """rosbags storage writer (``path``, ``add_msgtype``, ``add_connection``, ``write``,
    ``close``, ``abort``) plus :meth:`flush`. Not thread-safe (the bag writer locks)."""

    def __init__(self, path: Path, compression: object = None) -> None:
        if getattr(compression, "name", "NONE") != "NONE":
            raise BagError(f"{path}: compressed MCAP is not supported by this writer")
        self.path = Path(path) / f"{Path(path).name}.mcap"
        self._file = open(self.path, "xb", buffering=0)
        self._offset = 0
        self._crc = 0  # CRC-32 of the data section so far
        self._pending: list[bytes] = []  # records for the file, not yet written
        self._schema_ids: dict[str, int] = {}
        self._schemas: list[bytes] = []
        self._channels: list[bytes] = []
        self._chunk_indexes: list[bytes] = []
        self._counts: dict[int, int] = {}
        self._start, self._end = 2**64 - 1, 0
        self._chunk = bytearray()
        self._index: dict[int, list[int]] = {}  # channel -> [log time, offset, ...]
        self._chunk_start, self._chunk_end = 2**64 - 1, 0
        self._dirty = True
        self.flushes = 0
        self.flush_seconds = 0.0
        self._pending.append(MAGIC + record(OP_HEADER, string("ros2") + string("metarl_ros")))
        self.flush()
        fsync_directory(self.path.parent)

    # ------------------------------------------------------------------ rosbags protocol

    def add_msgtype(self, connection) -> None:
        schema_id = len(self._schemas) + 1
        encoding = "ros2idl" if connection.msgdef.format.name == "IDL" else "ros2msg"
        data = connection.msgdef.data.encode("utf-8")
        body = (struct.pack("<H", schema_id) + string(connection.msgtype) + string(encoding)
                + struct.pack("<I", len(data)) + data)
        self._schema_ids[connection.msgtype] = schema_id
        self._schemas.append(record(OP_SCHEMA, body))
        self._pending.append(self._schemas[-1])

    def add_connection(self, connection, offered_qos_profiles: str) -> None:
        metadata = {"offered_qos_profiles": offered_qos_profiles,
                    "topic_type_hash": connection.digest or ""}
        body = (struct.pack("<HH", connection.id, self._schema_ids[connection.msgtype])
                + string(connection.topic) + string(connection.ext.serialization_format)
                + string_map(metadata))
        self._channels.append(record(OP_CHANNEL, body))
        self._pending.append(self._channels[-1])
        self._counts[connection.id] = 0

    def write(self, connection, timestamp: int, data: bytes | memoryview) -> None:
        cid = connection.id
        chunk = self._chunk
        index = self._index.get(cid)
        if index is None:
            index = self._index[cid] = []
        index.append(timestamp)
        index.append(len(chunk))
        chunk += _MESSAGE.pack(OP_MESSAGE, _MESSAGE_FIELDS + len(data), cid, 0, timestamp,
                               timestamp)
        chunk += data
        self._counts[cid] += 1
        if timestamp < self._chunk_start:
            self._chunk_start = timestamp
        if timestamp > self._chunk_end:
            self._chunk_end = timestamp
        if len(chunk) >= CHUNK_SIZE:
            self._close_chunk()
            self._write_pending()

    def flush(self) -> None:
        """Close the open chunk, write everything pending and ``fsync`` the file."""
        self._close_chunk()
        self._write_pending()
        if self._dirty:
            start = time.perf_counter()
            os.fsync(self._file.fileno())
            self._dirty = False
            self.flushes += 1
            self.flush_seconds += time.perf_counter() - start

    def close(self, version: int, metadata: str) -> None:
        """Finish the file: last chunk, ``rosbag2`` metadata, summary, footer; fsync."""
        del version  # in ``metadata`` already
        self._close_chunk()
        body = string("rosbag2") + string_map({"serialized_metadata": metadata})
        metadata_offset = self._offset + sum(len(r) for r in self._pending)
        self._pending.append(record(OP_METADATA, body))
        metadata_length = len(self._pending[-1])
        self._write_pending()
        self._emit(record(OP_DATA_END, struct.pack("<I", self._crc)))
        summary_start = self._offset
        groups: list[tuple[int, list[bytes]]] = [
            (OP_SCHEMA, self._schemas), (OP_CHANNEL, self._channels),
            (OP_CHUNK_INDEX, self._chunk_indexes),
            (OP_METADATA_INDEX, [record(OP_METADATA_INDEX, struct.pack(
                "<QQ", metadata_offset, metadata_length) + string("rosbag2"))]),
            (OP_STATISTICS, [self._statistics()])]
        summary = bytearray()
        offsets = bytearray()
        for op, records in groups:
            if records:
                start = summary_start + len(summary)
                for item in records:
                    summary += item
                offsets += record(OP_SUMMARY_OFFSET, struct.pack(
                    "<BQQ", op, start, summary_start + len(summary) - start))
        summary_offset_start = summary_start + len(summary)
        tail = bytes(summary + offsets) + _RECORD.pack(OP_FOOTER, 20) + struct.pack(
            "<QQ", summary_start, summary_offset_start)
        self._emit(tail + struct.pack("<I", zlib.crc32(tail)) + MAGIC)
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close the file as it is (a truncated file, as after a kill)."""
        self._file.close()

    # ------------------------------------------------------------------ internals

    def _statistics(self) -> bytes:
        counts = b"".join(struct.pack("<HQ", c, n) for c, n in sorted(self._counts.items()))
        total = sum(self._counts.values())
        start, end = (self._start, self._end) if total else (0, 0)
        return record(OP_STATISTICS, struct.pack(
            "<QHIIIIQQI", total, len(self._schemas), len(self._channels), 0, 1,
            len(self._chunk_indexes), start, end, len(counts)) + counts)

    def _close_chunk(self) -> None:
        chunk = self._chunk
        if not chunk:
            return
        size = len(chunk)
        start, end = self._chunk_start, self._chunk_end
        head = struct.pack("<QQQI", start, end, size, zlib.crc32(chunk)) + string("") + \
            struct.pack("<Q", size)
        chunk_offset = self._offset + sum(len(r) for r in self._pending)
        chunk_record = _RECORD.pack(OP_CHUNK, len(head) + size) + head + bytes(chunk)
        indexes = bytearray()
        offsets = bytearray()
        index_start = chunk_offset + len(chunk_record)
        for cid, entries in self._index.items():
            offsets += struct.pack("<HQ", cid, index_start + len(indexes))
            indexes += record(OP_MESSAGE_INDEX, struct.pack("<HI", cid, 8 * len(entries))
                              + struct.pack(f"<{len(entries)}Q", *entries))
        self._pending.append(chunk_record + bytes(indexes))
        self._chunk_indexes.append(record(OP_CHUNK_INDEX, struct.pack(
            "<QQQQI", start, end, chunk_offset, len(chunk_record), len(offsets)) + bytes(offsets)
            + struct.pack("<Q", len(indexes)) + string("") + struct.pack("<QQ", size, size)))
        self._start = min(self._start, start)
        self._end = max(self._end, end)
        self._chunk = bytearray()
        self._index = {}
        self._chunk_start, self._chunk_end = 2**64 - 1, 0

    def _write_pending(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written:]
        self._crc = zlib.crc32(data, self._crc)
        self._offset += len(data)
        self._dirty = True
