"""Writing rosbag2 bags from serialized (CDR) messages, on disk within a flush period.

Messages arrive already serialized (CDR bytes, as a raw subscription hands them over) and are
written as they are -- no decode/encode per message. Every topic is registered with its
message definition from the ROS 2 Jazzy typestore (plus its type hash and the publishers'
offered QoS), so ``ros2 bag info`` / ``ros2 bag play`` and readers that take definitions from
the bag (MCAP's ``mcap-ros2-support``, rosbags' ``AnyReader``) read it without the message
packages installed. Formats:

* ``mcap`` (default), rosbag2 metadata version 9: what Jazzy and later record by default;
* ``sqlite3`` with metadata version 8: the format to use when the bag must play on Humble.

``rosbags``' :class:`~rosbags.rosbag2.Writer` keeps the bag (``metadata.yaml``, connections);
the data files are written by this package's storages
(:class:`~metarl_ros.recording.mcap_storage.McapStorage`,
:class:`~metarl_ros.recording.sqlite_storage.SqliteStorage`), which can be **flushed**: an
MCAP chunk is closed and ``fsync``-ed, a sqlite3 transaction committed. :class:`BagWriter`
flushes every ``flush_period_s`` (0.5 s by default): a recorder killed with SIGKILL, or a
power loss, costs at most the messages of that last period; ``metarl bag repair``
(:mod:`~metarl_ros.recording.repair`) makes a bag of the rest.

A bag is written straight into its final directory (rosbag2 refuses existing ones);
``metadata.yaml`` is written last, atomically, by :meth:`BagWriter.close`. A bag without it
was not closed (:func:`~metarl_ros.recording.formats.bag_is_complete`).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from rosbags.interfaces import Qos
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys.store import Typestore

from metarl_ros.recording.formats import (
    DEFAULT_VERSION,
    STORAGE_FORMATS,
    BagError,
    jazzy_typestore,
    register_from_share,
)
from metarl_ros.recording.mcap_storage import McapStorage, fsync_directory
from metarl_ros.recording.sqlite_storage import SqliteStorage

#: default seconds between two flushes (what a kill can lose)
FLUSH_PERIOD_S = 0.5
_PLUGINS = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class DurableWriter(Writer):
    """rosbags' bag writer with this package's flushable storages."""

    STORAGE_PLUGINS = {StoragePlugin.MCAP: McapStorage,  # type: ignore[dict-item]
                       StoragePlugin.SQLITE3: SqliteStorage}


def open_writer(path: Path, storage: str, version: int) -> DurableWriter:
    """An opened :class:`DurableWriter` (``path`` must not exist)."""
    writer = DurableWriter(path, version=version,  # type: ignore[arg-type]
                           storage_plugin=_PLUGINS[storage])
    writer.open()
    return writer


def finish(writer: DurableWriter, path: Path) -> None:
    """Close ``writer`` and make ``metadata.yaml`` and the directory durable."""
    writer.close()
    metadata = path / "metadata.yaml"
    with open(metadata, "rb") as stream:
        os.fsync(stream.fileno())
    fsync_directory(path)


class BagWriter:
    """A rosbag2 bag being written from serialized (CDR) messages. Thread-safe.

    Args:
        path: bag directory; must not exist yet (rosbag2 never writes into an existing one).
        storage: ``mcap`` (default) or ``sqlite3``.
        version: rosbag2 metadata version, 8 or 9; default :data:`DEFAULT_VERSION`.
        typestore: where message definitions come from (default: ROS 2 Jazzy's).
        flush_period_s: :meth:`write` flushes (:meth:`flush`) when the last flush is this
            old; 0 = only on :meth:`flush` and :meth:`close`.

    Topics are added with :meth:`add_topic` (at any time, also after messages were written);
    :meth:`close` is idempotent and must be called to make the bag complete.
    """

    def __init__(self, path: str | Path, storage: str = "mcap", version: int | None = None,
                 typestore: Typestore | None = None,
                 flush_period_s: float = FLUSH_PERIOD_S) -> None:
        if storage not in STORAGE_FORMATS:
            raise BagError(f"storage {storage!r}: expected one of {', '.join(STORAGE_FORMATS)}")
        self.path = Path(path)
        self.storage = storage
        self.version = DEFAULT_VERSION[storage] if version is None else int(version)
        if self.version not in (8, 9):
            raise BagError(f"rosbag2 metadata version {self.version}: expected 8 or 9")
        if self.path.exists():
            raise BagError(f"{self.path}: exists already; a bag is always written into a new "
                           "directory")
        self.typestore = typestore or jazzy_typestore()
        self.flush_period_s = float(flush_period_s)
        self._writer = open_writer(self.path, storage, self.version)
        self._lock = threading.Lock()
        self._connections: dict[str, object] = {}
        self._next_flush = time.monotonic() + self.flush_period_s
        self.types: dict[str, str] = {}
        """topic -> message type of every registered topic."""
        self.counts: dict[str, int] = {}
        """topic -> messages written."""
        self.closed = False

    def has_topic(self, topic: str) -> bool:
        return topic in self._connections

    def add_topic(self, topic: str, msgtype: str, qos: Qos | None = None) -> None:
        """Register ``topic`` with the definition of ``msgtype`` (``pkg/msg/Name``).

        Raises :class:`BagError` if the type is unknown (not in the typestore and not found
        as ``share/<pkg>/msg/<Name>.msg`` under ``AMENT_PREFIX_PATH``) or the topic exists.
        """
        with self._lock:
            if self.closed:
                raise BagError(f"{self.path}: bag is closed")
            if topic in self._connections:
                raise BagError(f"{self.path}: topic {topic} registered twice")
            if msgtype not in self.typestore.fielddefs and not register_from_share(
                    self.typestore, msgtype):
                raise BagError(f"unknown message type {msgtype!r} (topic {topic}): no "
                               "definition in the ROS 2 Jazzy typestore or the installed "
                               "packages; cannot record it with a definition")
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self.typestore,
                offered_qos_profiles=[qos] if qos is not None else [])
            self.types[topic] = msgtype
            self.counts[topic] = 0

    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> bool:
        """Append one serialized message; False (nothing written) once the bag is closed."""
        with self._lock:
            if self.closed:
                return False
            self._writer.write(self._connections[topic], int(timestamp_ns), data)  # type: ignore[arg-type]
            self.counts[topic] += 1
            if self.flush_period_s and time.monotonic() >= self._next_flush:
                self._flush()
            return True

    def flush(self) -> None:
        """Put everything written so far on disk (MCAP chunk + fsync, sqlite3 commit)."""
        with self._lock:
            if not self.closed:
                self._flush()

    def flush_if_due(self) -> float:
        """Flush if the flush period is over; returns the seconds until the next one is due
        (for a caller that waits for messages in between)."""
        with self._lock:
            if self.closed or not self.flush_period_s:
                return 3600.0
            now = time.monotonic()
            if now >= self._next_flush:
                self._flush()
                now = time.monotonic()
            return max(0.0, self._next_flush - now)

    def _flush(self) -> None:
        self._writer.storage.flush()  # type: ignore[union-attr]
        self._next_flush = time.monotonic() + self.flush_period_s

    @property
    def flushes(self) -> int:
        """How many flushes reached the disk so far."""
        return getattr(self._writer.storage, "flushes", 0)

    @property
    def flush_seconds(self) -> float:
        """Time spent in flushes so far (mostly the disk's fsync), s."""
        return getattr(self._writer.storage, "flush_seconds", 0.0)

    @property
    def message_count(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def close(self) -> bool:
        """Flush and finish the bag (index, summary, ``metadata.yaml``). Idempotent.

        Returns True the first time (the call that closed it).
        """
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            finish(self._writer, self.path)
            return True

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueuedBagWriter:
    """A :class:`BagWriter` driven by a thread of its own.

    :meth:`write` only enqueues (a recorder's callbacks never wait for the disk, and an
    exception raised in the caller -- a Ctrl-C -- cannot interrupt a record half-written), and
    every storage call happens on that one thread, as sqlite3 requires; between messages the
    thread flushes on time (``flush_period_s``). :meth:`add_topic` waits for the thread and
    raises its error; :meth:`close` writes everything queued first. Arguments as
    :class:`BagWriter`.
    """

    def __init__(self, path: str | Path, storage: str = "mcap", version: int | None = None,
                 typestore: Typestore | None = None,
                 flush_period_s: float = FLUSH_PERIOD_S) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        opened: Future = Future()
        self._thread = threading.Thread(
            target=self._run, name="bag_writer", daemon=True,
            args=(opened, path, storage, version, typestore, flush_period_s))
        self._thread.start()
        self._writer: BagWriter = opened.result()  # raises BagError if it cannot be created
        self._close_lock = threading.Lock()
        self.closed = False
        self.write_error = ""
        """the first failed write or flush (e.g. disk full), '' if none."""

    def _run(self, opened, path, storage, version, typestore, flush_period_s) -> None:
        try:
            writer = BagWriter(path, storage, version, typestore, flush_period_s)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            opened.set_exception(exc)
            return
        opened.set_result(writer)
        wait = writer.flush_period_s or None
        while True:
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = ()
            if item is None:
                self._guarded(writer.close)
                return
            if item and item[0] == "add":
                _, args, future = item
                try:
                    future.set_result(writer.add_topic(*args))
                except BaseException as exc:  # noqa: BLE001 - raised in the caller
                    future.set_exception(exc)
            elif item:
                self._guarded(writer.write, *item)
            wait = self._guarded(writer.flush_if_due)  # seconds to the next flush
            if wait is None:
                wait = writer.flush_period_s or None

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - keep recording the other messages
            if not self.write_error:
                self.write_error = f"{type(exc).__name__}: {exc}"
            return None

    @property
    def path(self) -> Path:
        return self._writer.path

    @property
    def storage(self) -> str:
        return self._writer.storage

    @property
    def version(self) -> int:
        return self._writer.version

    @property
    def flush_period_s(self) -> float:
        return self._writer.flush_period_s

    @property
    def flushes(self) -> int:
        return self._writer.flushes

    @property
    def counts(self) -> dict[str, int]:
        """topic -> messages written so far (queued ones not yet)."""
        return dict(self._writer.counts)

    @property
    def message_count(self) -> int:
        return self._writer.message_count

    def has_topic(self, topic: str) -> bool:
        return self._writer.has_topic(topic)

    def add_topic(self, topic: str, msgtype: str, qos: Qos | None = None) -> None:
        if self.closed:
            raise BagError(f"{self.path}: bag is closed")
        done: Future = Future()
        self._queue.put(("add", (topic, msgtype, qos), done))
        done.result()

    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> bool:
        """Queue one message; False once the bag is closing."""
        if self.closed:
            return False
        self._queue.put((topic, timestamp_ns, data))
        return True

    def close(self) -> bool:
        """Write what is queued, then close the bag. Idempotent; True the first time."""
        with self._close_lock:
            if self.closed:
                return False
            self.closed = True
            self._queue.put(None)
            self._thread.join()
            return True

    def __enter__(self) -> "QueuedBagWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
