"""sqlite3 storage for rosbag2 bags: committed to disk on a timer, and read back after a kill.

:class:`SqliteStorage` is ``rosbags``' sqlite3 storage (the rosbag2 schema Humble plays) with
two changes: the database runs in WAL mode with ``synchronous=FULL`` and :meth:`flush`
commits -- each commit is on disk (``fsync`` of the WAL) before it returns, so a SIGKILL or
a power loss takes only the messages since the last flush. At close the database goes back
to a rollback journal, so the finished bag is one self-contained ``.db3`` file.

:class:`SqliteSalvage` reads a killed recording: the ``.db3`` and its ``-wal``/``-journal``
are copied to a scratch folder (the original stays untouched) and opened there, which makes
sqlite replay the committed transactions and drop the one in progress.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from rosbags.rosbag2.storage_sqlite3 import Sqlite3Writer

from metarl_ros.recording.formats import BagError
from metarl_ros.recording.mcap_salvage import SalvageReport, Topic


class SqliteStorage(Sqlite3Writer):
    """rosbags' sqlite3 storage writer, durable per :meth:`flush`."""

    def __init__(self, path: Path, compression: object) -> None:
        super().__init__(path, compression)  # type: ignore[arg-type]
        if not isinstance(getattr(self, "conn", None), sqlite3.Connection):
            raise BagError("this rosbags version's sqlite3 writer has no connection to flush")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.flushes = 0
        self.flush_seconds = 0.0

    def flush(self) -> None:
        """Commit what was written: on disk when this returns."""
        start = time.perf_counter()
        self.conn.commit()
        self.flushes += 1
        self.flush_seconds += time.perf_counter() - start

    def close(self, version: int, metadata: str) -> None:
        self.conn.commit()
        self.conn.execute("PRAGMA journal_mode=DELETE")  # one file again, no -wal/-shm
        super().close(version, metadata)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


class SqliteSalvage:
    """The committed messages of a ``.db3`` file, through a copy in ``scratch``; same
    interface as :class:`~metarl_ros.recording.mcap_salvage.McapSalvage`."""

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path = Path(path)
        self.topics: dict[int, Topic] = {}
        self.report = SalvageReport.start(self.path)
        self._copy = Path(scratch) / self.path.name
        try:
            for suffix in ("", "-wal", "-journal"):
                source = self.path.with_name(self.path.name + suffix)
                if source.is_file():
                    shutil.copyfile(source, self._copy.with_name(self._copy.name + suffix))
        except OSError as exc:
            raise BagError(f"{self.path}: cannot read: {exc.strerror or exc}") from None

    def messages(self) -> Iterator[tuple[Topic, int, bytes]]:
        try:
            conn = sqlite3.connect(self._copy)
        except sqlite3.Error as exc:
            raise BagError(f"{self.path}: not a readable sqlite3 database: {exc}") from None
        try:
            try:
                self._read_topics(conn)
                rows = conn.execute("SELECT topic_id, timestamp, data FROM messages ORDER BY id")
            except sqlite3.DatabaseError as exc:
                raise BagError(f"{self.path}: not a rosbag2 sqlite3 database: {exc}") from None
            self.report.complete = True
            try:
                for topic_id, timestamp, data in rows:
                    topic = self.topics.get(topic_id)
                    if topic is not None:
                        self.report.messages += 1
                        yield topic, int(timestamp), bytes(data)
            except sqlite3.DatabaseError as exc:
                self.report.complete = False
                self.report.problems.append(f"reading stopped: {exc}")
        finally:
            conn.close()
        self.report.good_bytes = self.report.size

    def _read_topics(self, conn: sqlite3.Connection) -> None:
        definitions: dict[str, tuple[str, str, str]] = {}
        if "message_definitions" in {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}:
            for msgtype, encoding, text, digest in conn.execute(
                    "SELECT topic_type, encoding, encoded_message_definition, "
                    "type_description_hash FROM message_definitions"):
                definitions[msgtype] = (encoding, text, digest)
        has_hash = "type_description_hash" in _columns(conn, "topics")
        query = ("SELECT id, name, type, serialization_format, offered_qos_profiles"
                 + (", type_description_hash" if has_hash else "") + " FROM topics")
        for row in conn.execute(query):
            cid, name, msgtype, fmt, qos = row[:5]
            encoding, text, digest = definitions.get(msgtype, ("ros2msg", "", ""))
            self.topics[cid] = Topic(cid, name, msgtype, encoding or "ros2msg", text or "",
                                     fmt, qos or "", (row[5] if has_hash else "") or digest)
