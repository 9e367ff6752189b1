"""What a rosbag2 bag is made of: storage formats, versions, message types, QoS, layout checks.

Shared by the writer (:mod:`~metarl_ros.recording.writer`), the repair
(:mod:`~metarl_ros.recording.repair`) and the readers in :mod:`metarl_ros.learning`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from metarl_ros.core.errors import MetarlError

StorageFormat = Literal["mcap", "sqlite3"]
STORAGE_FORMATS: tuple[str, ...] = ("mcap", "sqlite3")
#: metadata version written by default per storage format
DEFAULT_VERSION: dict[str, int] = {"mcap": 9, "sqlite3": 8}
#: data file suffix per storage format
SUFFIXES: dict[str, str] = {"mcap": ".mcap", "sqlite3": ".db3"}

JOINT_STATE = "sensor_msgs/msg/JointState"
FLOAT64_ARRAY = "std_msgs/msg/Float64MultiArray"
STRING = "std_msgs/msg/String"


class BagError(MetarlError, ValueError):
    """A bag cannot be written or read as asked; the message names the bag and the problem."""


def jazzy_typestore() -> Typestore:
    """A fresh typestore with the ROS 2 Jazzy message definitions (pinned, not ``LATEST``)."""
    return get_typestore(Stores.ROS2_JAZZY)


def make_qos(reliable: bool = True, transient_local: bool = False, depth: int = 10) -> Qos:
    """A rosbags QoS record (what ``offered_qos_profiles`` in the bag metadata holds)."""
    zero = QosTime(0, 0)
    return Qos(
        history=QosHistory.KEEP_LAST, depth=int(depth),
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=zero, lifespan=zero, liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=zero, avoid_ros_namespace_conventions=False,
    )


def parse_qos_text(text: str) -> list[Qos]:
    """``offered_qos_profiles`` as stored in a data file (YAML: a v9 list or v8 text) -> QoS
    records; ``[]`` if it cannot be parsed (the QoS is informative only)."""
    import yaml
    from rosbags.rosbag2.metadata import parse_qos

    try:
        loaded = yaml.safe_load(text) if text else []
        return parse_qos(loaded if isinstance(loaded, list) else text)
    except Exception:  # noqa: BLE001 - an unreadable QoS does not cost the messages
        return []


def register_from_share(store: Typestore, msgtype: str) -> bool:
    """Try to register ``pkg/msg/Name`` from an installed ``share/pkg/msg/Name.msg``."""
    from rosbags.typesys import get_types_from_msg

    pkg, _, name = msgtype.split("/")
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        candidate = Path(prefix) / "share" / pkg / "msg" / f"{name}.msg"
        if prefix and candidate.is_file():
            try:
                store.register(get_types_from_msg(candidate.read_text(), msgtype))
                store.generate_msgdef(msgtype, ros_version=2)  # all dependencies known?
                return True
            except Exception:  # noqa: BLE001 - a definition we cannot use: report as unknown
                return False
    return False


def type_hash(msgtype: str, msgdef: str, encoding: str) -> str:
    """RIHS01 hash of ``msgtype`` from its definition text (as stored in a data file), or of
    the Jazzy typestore's definition when the text is missing or cannot be parsed; '' if
    neither is known."""
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    store = jazzy_typestore()
    if msgdef:
        try:
            if encoding == "ros2idl":
                types: dict = {}
                for part in msgdef.split("=" * 80 + "\n")[1:]:
                    types.update(get_types_from_idl(part.split("\n", 1)[1]))
                store.register(types or get_types_from_idl(msgdef))
            else:
                store.register(get_types_from_msg(msgdef, msgtype))
            return store.hash_rihs01(msgtype)
        except Exception:  # noqa: BLE001 - fall back to the pinned definitions
            store = jazzy_typestore()
    if msgtype in store.fielddefs:
        return store.hash_rihs01(msgtype)
    return ""


# ------------------------------------------------------------------------------------------
# Bag directories


def bag_is_complete(path: str | Path) -> bool:
    """True if ``path`` is a rosbag2 directory whose writer closed it (``metadata.yaml``)."""
    return (Path(path) / "metadata.yaml").is_file()


def data_files(path: Path) -> list[Path]:
    """The bag's data files (``*.mcap``, ``*.db3``) in name order."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".mcap", ".db3"))


def check_bag_folder(path: str | Path, allow_truncated: bool = False) -> Path:
    """Return ``path`` if it is a closed bag directory; else raise :class:`BagError` saying
    what it is: missing, not a bag, an empty folder, an empty data file, or a bag whose
    writer never closed it (truncated; ``metarl bag repair`` recovers it -- accepted with
    ``allow_truncated``)."""
    path = Path(path)
    if not path.exists():
        raise BagError(f"{path}: bag not found")
    if not path.is_dir():
        raise BagError(f"{path}: not a rosbag2 directory (a bag is a folder with "
                       "metadata.yaml and .mcap or .db3 files)")
    if bag_is_complete(path):
        return path
    try:
        entries = list(path.iterdir())
        files = data_files(path)
    except OSError as exc:
        raise BagError(f"{path}: cannot list the bag folder: {exc.strerror or exc}") from None
    if not entries:
        raise BagError(f"{path}: empty bag folder (no metadata.yaml and no data file): the "
                       "recorder wrote nothing, or this is not a bag")
    if not files:
        raise BagError(f"{path}: not a rosbag2 bag: no metadata.yaml and no .mcap or .db3 data "
                       f"file (found: {', '.join(sorted(p.name for p in entries)[:5])})")
    if all(f.stat().st_size == 0 for f in files):
        raise BagError(f"{path}: empty bag: {', '.join(f.name for f in files)} is 0 bytes (the "
                       "recorder was stopped before anything reached the disk); nothing to "
                       "recover")
    if allow_truncated:
        return path
    raise BagError(f"{path}: truncated bag: no metadata.yaml (the recorder did not close it); "
                   f"`metarl bag repair {path}` recovers the messages that reached the disk")
