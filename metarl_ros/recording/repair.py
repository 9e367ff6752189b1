"""``metarl bag repair``: turn a killed recording into a bag every reader opens.

A recorder killed with SIGKILL (or a power loss) leaves a bag directory without
``metadata.yaml`` and an MCAP file without summary and footer (or a sqlite3 database with an
uncommitted transaction). :func:`repair_bag` recovers every complete message in the data
files (:class:`~metarl_ros.recording.mcap_salvage.McapSalvage`,
:class:`~metarl_ros.recording.sqlite_storage.SqliteSalvage`) and writes them, with their
topics, definitions, type hashes and QoS, into a new bag through the recorder's own writer:
an indexed MCAP (or sqlite3) file and ``metadata.yaml``.

Nothing is half-written: the new bag is built in a hidden scratch folder beside the target
and only renamed into place once it is closed, synced and opens with ``rosbags``. In place,
the original folder is first renamed to ``<name>.orig`` (kept, never modified); with ``out``
the original stays where it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metarl_ros.recording.formats import (
    DEFAULT_VERSION,
    BagError,
    check_bag_folder,
    data_files,
    jazzy_typestore,
    parse_qos_text,
    type_hash,
)
from metarl_ros.recording.mcap_salvage import McapSalvage, SalvageReport, Topic
from metarl_ros.recording.mcap_storage import fsync_directory
from metarl_ros.recording.sqlite_storage import SqliteSalvage
from metarl_ros.recording.writer import finish, open_writer


@dataclass
class RepairResult:
    """What :func:`repair_bag` did."""

    path: Path
    """the readable bag (the input itself when it needed no repair)."""
    original: Path | None = None
    """where the original folder was kept (in-place repair), else None."""
    storage: str = ""
    repaired: bool = False
    """False: the bag was complete and readable already; nothing was written."""
    counts: dict[str, int] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
    files: list[SalvageReport] = field(default_factory=list)

    @property
    def messages(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.repaired:
            return f"{self.path}: complete and readable; nothing to repair"
        span = (self.end_ns - self.start_ns) * 1e-9 if self.messages else 0.0
        topics = ", ".join(f"{t} {n}" for t, n in sorted(self.counts.items())) or "none"
        lines = [f"repaired {self.path} ({self.storage}): recovered {self.messages} messages "
                 f"spanning {span:.2f} s ({topics})"]
        for report in self.files:
            if report.lost_bytes and not report.complete:
                lines.append(f"  {report.path.name}: {report.lost_bytes} bytes after the last "
                             "complete message are lost (cut off mid-record)")
            lines.extend(f"  {report.path.name}: {problem}" for problem in report.problems)
        if self.original is not None:
            lines.append(f"  the original is kept unchanged in {self.original}")
        return "\n".join(lines)


def _readable(path: Path) -> bool:
    """True if ``path`` has metadata.yaml and rosbags opens it (summary and index intact)."""
    from rosbags.rosbag2 import Reader

    if not (path / "metadata.yaml").is_file():
        return False
    try:
        with Reader(path):  # opens every data file: summary, index, schema
            return True
    except Exception:  # noqa: BLE001 - anything that stops a reader is what repair fixes
        return False


def _metadata(path: Path) -> dict:
    """What a (possibly partial) metadata.yaml still says, {} if nothing."""
    try:
        info = yaml.safe_load((path / "metadata.yaml").read_text())
        return dict(info.get("rosbag2_bagfile_information") or {})
    except Exception:  # noqa: BLE001 - missing or cut: recover from the data files alone
        return {}


def _inputs(path: Path) -> tuple[str, list[Path], int]:
    """Storage format, data files in order and metadata version of the bag at ``path``."""
    check_bag_folder(path, allow_truncated=True)  # empty folder, empty files, not a bag ...
    info = _metadata(path)
    listed = [path / p for p in info.get("relative_file_paths") or []]
    files = [p for p in listed if p.is_file()] if listed and all(
        p.is_file() for p in listed) else data_files(path)
    if not files:
        raise BagError(f"{path}: not a rosbag2 bag: no .mcap or .db3 data file")
    suffixes = {p.suffix for p in files}
    if len(suffixes) > 1:
        raise BagError(f"{path}: holds both .mcap and .db3 files; repair one bag at a time")
    storage = "mcap" if suffixes == {".mcap"} else "sqlite3"
    version = info.get("version")
    if version not in (8, 9):
        version = DEFAULT_VERSION[storage]
    if all(p.stat().st_size == 0 for p in files):
        raise BagError(f"{path}: empty bag: {', '.join(p.name for p in files)} is 0 bytes (the "
                       "recorder was stopped before anything reached the disk); nothing to "
                       "recover")
    return storage, files, int(version)


def _add_connection(writer, topic: Topic):
    """Register a salvaged topic with its own definition, hash and QoS."""
    qos = parse_qos_text(topic.offered_qos_profiles)
    digest = topic.type_hash or type_hash(topic.msgtype, topic.msgdef, topic.encoding)
    if topic.msgdef and digest:
        return writer.add_connection(
            topic.topic, topic.msgtype, msgdef=topic.msgdef, rihs01=digest,
            serialization_format=topic.serialization_format or "cdr",
            offered_qos_profiles=qos)
    store = jazzy_typestore()
    if topic.msgtype not in store.fielddefs:
        raise BagError(f"topic {topic.topic}: the file has no definition of {topic.msgtype!r} "
                       "and the ROS 2 Jazzy typestore does not know it")
    return writer.add_connection(topic.topic, topic.msgtype, typestore=store,
                                 serialization_format=topic.serialization_format or "cdr",
                                 offered_qos_profiles=qos)


def _rebuild(files: list[Path], storage: str, version: int, staged: Path,
             scratch: Path, result: RepairResult) -> None:
    writer = open_writer(staged, storage, version)
    try:
        connections: dict[tuple, object] = {}
        start, end = 2**63 - 1, 0
        for file in files:
            salvage = (McapSalvage(file) if storage == "mcap" else SqliteSalvage(file, scratch))
            result.files.append(salvage.report)
            for topic, log_time, data in salvage.messages():
                key = (topic.topic, topic.msgtype, topic.serialization_format,
                       topic.offered_qos_profiles)
                connection = connections.get(key)
                if connection is None:
                    connection = connections[key] = _add_connection(writer, topic)
                    result.counts.setdefault(topic.topic, 0)
                writer.write(connection, log_time, data)
                result.counts[topic.topic] += 1
                start, end = min(start, log_time), max(end, log_time)
            for topic in salvage.topics.values():  # topics declared but never written
                key = (topic.topic, topic.msgtype, topic.serialization_format,
                       topic.offered_qos_profiles)
                if key not in connections:
                    connections[key] = _add_connection(writer, topic)
                    result.counts.setdefault(topic.topic, 0)
        result.start_ns, result.end_ns = (start, end) if result.messages else (0, 0)
    except BaseException:
        writer.abort()
        raise
    finish(writer, staged)


def _kept_name(path: Path) -> Path:
    candidate = path.with_name(path.name + ".orig")
    n = 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.orig{n}")
        n += 1
    return candidate


def repair_bag(path: str | Path, out: str | Path | None = None) -> RepairResult:
    """Recover a killed recording into a readable bag; see the module docstring.

    ``path`` is the bag folder (or one of its data files). Without ``out`` the repaired bag
    takes the folder's place and the original moves to ``<name>.orig``; with ``out`` (a new
    path) the original is left as it is. Raises :class:`BagError` for what is not a bag, an
    empty folder or data file, and unreadable files.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".mcap", ".db3"):
        path = path.parent
    if (path / "metadata.yaml").is_file() and _readable(path):
        return RepairResult(path)
    storage, files, version = _inputs(path)
    target = Path(out) if out is not None else path
    if out is not None and target.exists():
        raise BagError(f"{target}: exists already; --out must be a new path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return _repair(path, target, out is None, storage, files, version)
    except OSError as exc:
        raise BagError(f"{path}: repair failed: {exc}; the original is untouched") from None


def _repair(path: Path, target: Path, in_place: bool, storage: str, files: list[Path],
            version: int) -> RepairResult:
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.repair-", dir=target.parent))
    try:
        staged = scratch / target.name
        result = RepairResult(target, storage=storage, repaired=True)
        work = scratch / "work"
        work.mkdir()
        _rebuild(files, storage, version, staged, work, result)
        if not _readable(staged):
            raise BagError(f"{path}: the repaired bag does not open; the original is untouched")
        if in_place:
            result.original = _kept_name(path)
            os.rename(path, result.original)
            try:
                os.rename(staged, target)
            except OSError:
                os.rename(result.original, path)
                raise
        else:
            os.rename(staged, target)
        fsync_directory(target.parent)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
