"""Reading the topics ``metarl retrain`` uses out of a rosbag2 bag, as raw columns.

Part of :mod:`metarl_ros.learning.bag_dataset` (see there for topics, checks and errors):
opening a bag with ``rosbags.highlevel.AnyReader`` (definitions from the bag, ROS 2 Jazzy's
as the fallback), checking its topics and types, reading the joint states, reference,
commands and task events in one pass (fast CDR decoders, rosbags' deserializer as the
fallback), and mapping joint states to the model's joint order by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from metarl_ros.control.joint_map import JointNameMapper, RejectedInput
from metarl_ros.core.schema import StrictModel
from metarl_ros.recording.bag import (
    FLOAT64_ARRAY,
    JOINT_STATE,
    STRING,
    BagError,
    CdrLayoutError,
    Float64ArrayDecoder,
    JointStateColumns,
    JointStateLayout,
    check_bag_folder,
    jazzy_typestore,
)


class BagTopics(StrictModel):
    """Topic names in the bags (``''`` = not recorded / not used)."""

    joint_states: str = "/joint_states"
    commands: str = "/effort_controller/commands"
    reference: str = "/reference"
    task_events: str = Field(default="/sim/true_task",
                             description="true task changes (sim_node); '' = none")



_EXPECTED = {"joint_states": JOINT_STATE, "reference": JOINT_STATE, "commands": FLOAT64_ARRAY,
             "task_events": STRING}


def open_reader(path: Path):
    from rosbags.highlevel import AnyReader, AnyReaderError

    check_bag_folder(path)  # missing, not a bag, empty, truncated: named as such
    reader = AnyReader([path], default_typestore=jazzy_typestore())
    try:
        reader.open()
    except AnyReaderError as exc:
        raise BagError(f"{path}: truncated or unreadable bag: {exc}; `metarl bag repair "
                       f"{path}` recovers the messages that reached the disk") from None
    except Exception as exc:  # noqa: BLE001 - storage layers raise many types on corrupt files
        raise BagError(f"{path}: truncated or unreadable bag: {type(exc).__name__}: {exc}; "
                       f"`metarl bag repair {path}` recovers the messages that reached the "
                       "disk") from None
    return reader


def check_topics(path: Path, reader, topics: BagTopics) -> dict[str, Any]:
    """Connections per role; raises BagError for missing/unknown topics and types."""
    available = reader.topics
    summary = ", ".join(f"{t} ({i.msgtype})" for t, i in sorted(available.items()))
    if reader.message_count == 0:
        raise BagError(f"{path}: empty bag (no messages; topics: {summary or 'none'})")
    roles: dict[str, Any] = {}
    for role, expected in _EXPECTED.items():
        topic = getattr(topics, role)
        if not topic:
            continue
        info = available.get(topic)
        if info is None:
            if role == "task_events":
                continue  # optional: no events recorded (e.g. from a real robot)
            raise BagError(f"{path}: missing topic {topic} ({role}; bag has: "
                           f"{summary or 'nothing'}); map topic names with --config")
        if info.msgtype != expected:
            raise BagError(f"{path}: unknown message type {info.msgtype!r} on {topic} "
                           f"({role} must be {expected})")
        if info.msgtype not in reader.typestore.fielddefs:
            raise BagError(f"{path}: unknown message type {info.msgtype!r} on {topic}: the bag "
                           "has no definition for it")
        roles[role] = info.connections
    return roles


class JointStream:
    """JointState messages of one topic: log times and the bytes, decoded column-wise later
    (:class:`~metarl_ros.recording.bag.JointStateColumns`)."""

    def __init__(self, reader) -> None:
        self.log: list[int] = []
        self.columns = JointStateColumns(fallback=lambda raw: _generic_joint_state(reader, raw))

    def __len__(self) -> int:
        return len(self.log)


@dataclass
class Streams:
    """Raw per-topic columns read from one bag (before alignment)."""

    states: JointStream
    references: JointStream
    cmd_log: list[int] = field(default_factory=list)
    cmd_values: list[tuple] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    read: int = 0


def read_streams(path: Path, reader, roles: dict[str, Any], progress: bool,
                  dropped: Counter) -> Streams:
    from tqdm import tqdm

    streams = Streams(JointStream(reader), JointStream(reader))
    role_of = {c.id: role for role, conns in roles.items() for c in conns}
    wanted = [c for conns in roles.values() for c in conns]
    total = sum(c.msgcount for c in wanted)
    command_decoder = Float64ArrayDecoder()
    # bound methods: this loop runs once per message
    add_state, log_state = streams.states.columns.add, streams.states.log.append
    add_reference, log_reference = (streams.references.columns.add,
                                    streams.references.log.append)
    bar = tqdm(total=total, disable=not progress, desc=f"read {path.name}", unit="msg",
               unit_scale=True, dynamic_ncols=True, mininterval=0.5)
    count = 0
    try:
        for connection, log_time, raw in reader.messages(connections=wanted):
            count += 1
            if not count & 4095:
                bar.update(4096)
            role = role_of[connection.id]
            try:
                if role == "joint_states":
                    add_state(raw)
                    log_state(log_time)
                elif role == "reference":
                    add_reference(raw)
                    log_reference(log_time)
                elif role == "commands":
                    try:
                        values = command_decoder(raw)
                    except CdrLayoutError:
                        values = tuple(reader.deserialize(raw, FLOAT64_ARRAY).data)
                    streams.cmd_log.append(log_time)
                    streams.cmd_values.append(values)
                else:
                    streams.events.append((log_time, reader.deserialize(raw, STRING).data))
            except Exception as exc:  # noqa: BLE001 - an undecodable message is counted
                dropped[f"{connection.topic}: undecodable message ({type(exc).__name__})"] += 1
    except Exception as exc:  # noqa: BLE001 - storage errors mid-file: truncated/corrupt
        raise BagError(f"{path}: truncated or corrupt bag: reading stopped after {count} "
                       f"messages: {type(exc).__name__}: {exc}") from None
    finally:
        bar.update(count & 4095)
        bar.close()
    streams.read = count
    if count < total:
        raise BagError(f"{path}: truncated bag: metadata lists {total} messages on the used "
                       f"topics, only {count} could be read")
    return streams


def _generic_joint_state(reader, raw) -> tuple[int, JointStateLayout, tuple]:
    """rosbags' deserializer, for what the fast decoder does not take (same record form)."""
    msg = reader.deserialize(raw, JOINT_STATE)
    stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    layout = JointStateLayout(tuple(msg.name), len(msg.position), len(msg.velocity),
                              len(msg.effort))
    record = [float(len(msg.position)), *msg.position, float(len(msg.velocity)),
              *msg.velocity, float(len(msg.effort)), *msg.effort]
    return stamp, layout, tuple(record)


def map_joint_states(path: Path, topic: str, stream: JointStream,
                      joint_names: Sequence[str], unnamed_ok: bool, need_effort: bool,
                      dropped: Counter) -> tuple[np.ndarray, ...]:
    """Stamps (M,) and position, velocity, effort (M, n) in the model's joint order, plus a
    valid mask (M,).

    Each message layout (names, array sizes) is checked once with the control loop's
    :class:`JointNameMapper`, then all its messages are converted together. Raises BagError
    when the names lack model joints (recorded on another robot, or for another model).
    """
    n = len(joint_names)
    m = len(stream)
    stamp = np.zeros(m, dtype=np.int64)
    position = np.zeros((m, n))
    velocity = np.zeros((m, n))
    effort = np.zeros((m, n))
    valid = np.zeros(m, dtype=bool)
    mapper = JointNameMapper(joint_names, allow_unnamed=unnamed_ok)
    row = 0
    for layout, stamps, pos, vel, eff in stream.columns.runs():
        rows = slice(row, row + len(stamps))
        row += len(stamps)
        stamp[rows] = stamps
        # the mapper maps a probe whose values are the source positions 0..size-1
        probe = np.arange(layout.n_position, dtype=np.float64)
        try:
            mapped = mapper.map(layout.names, probe, np.zeros(layout.n_velocity),
                                np.zeros(layout.n_effort) if layout.n_effort else None,
                                require_effort=need_effort)
        except RejectedInput as exc:
            if exc.reason in ("missing_joints", "no_names"):
                raise BagError(
                    f"{path}: joint names on {topic} do not match the model: {exc.detail} "
                    f"(message has {list(layout.names)}, model expects {list(joint_names)})"
                ) from None
            dropped[f"{topic}: {exc.reason.replace('_', ' ')}"] += len(stamps)
            continue
        index = mapped.position.astype(np.int64)
        position[rows] = pos[:, index]
        velocity[rows] = vel[:, index]
        if layout.n_effort:
            effort[rows] = eff[:, index]
        ok = np.isfinite(position[rows]).all(1) & np.isfinite(velocity[rows]).all(1)
        if need_effort:
            ok &= np.isfinite(effort[rows]).all(1)
        valid[rows] = ok
        if (~ok).any():
            dropped[f"{topic}: non-finite value on a model joint"] += int((~ok).sum())
    return stamp, position, velocity, effort, valid
