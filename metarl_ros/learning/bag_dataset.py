"""rosbag2 bags -> (s, a, r, s') transitions, split into tasks, for ``metarl retrain``.

ROS-free: bags are read with ``rosbags.highlevel.AnyReader``, which takes message definitions
from the bag, so bags written by :mod:`metarl_ros.nodes.recorder_node` and by
``ros2 bag record`` (MCAP or sqlite3) are read alike; bags without definitions (Humble's
sqlite3) fall back to the ROS 2 Jazzy definitions.

**Topics** (names mapped by :class:`BagTopics`): joint states and the reference
(``sensor_msgs/JointState``; the reference carries q_ref, qd_ref and qdd_ref in position,
velocity and effort, as sim_node publishes it), effort commands
(``std_msgs/Float64MultiArray``, in the model's joint order) and, optionally, true task events
(``std_msgs/String`` JSON, sim_node's ``/sim/true_task``). Joint states and the reference are
matched to the model's joints **by name** (:class:`~metarl_ros.control.joint_map.JointNameMapper`).

**Time.** Each bag has its own time axis: the joint states' header stamps (their log times if
the stamps are all zero). Commands carry no stamp, so each command is attached to the control
instant it answers by **log time** (receive time): the newest joint state on the control grid
received before the command. The grid follows the adapter's own decimation rule
(:class:`~metarl_ros.control.controller.AdaptiveController`): with joint states faster than the
control rate, only those one control period apart are control instants. The reference of an
instant is the newest one stamped no later than it (and at most ``reference_max_age_s`` older).

**Actions.** The adapter commands ``effort = clamp(effort_command(a, q, qd, ref))``, i.e. the
env's PD feedback plus ``a * action_scale`` (:func:`~metarl_ros.control.law.effort_command`). The
normalized action is recovered exactly by inverting it with the same function::

    a = (effort - effort_command(0, q, qd, ref)) / action_scale

from the joint state and reference of that instant. Not recoverable, hence dropped: commands
at an effort limit (clamped) and commands implying ``|a| > 1 + action_tolerance`` (not produced
by a residual policy: a safe action, another controller). Recording the action itself would
need a topic the adapter does not publish; inverting keeps bags from any effort controller
that uses the env's PD feedback usable.

**Transitions** are rebuilt exactly as :class:`~metarl_ros.control.controller.AdaptiveController`
builds them online, with the shared :func:`~metarl_ros.control.law.build_observation` and
:func:`~metarl_ros.control.law.tracking_reward`: ``s`` at control instant ``k`` with the previous
instant's action in its last block (zero after a non-policy command, as the adapter does),
``a`` from instant ``k``'s command, ``s'`` at instant ``k + 1``, ``r`` from the measured
tracking error at ``k + 1``. Instants further apart than 1.5 control periods do not form a
transition.

**Tasks.** Transitions are split where recorded fault events (true task changes) strike --
a transition belongs to the task in force during its step -- and equal tasks from several
bags are merged. Without events, a change in the encoder's posterior marks a new task
(:func:`posterior_change_points`).

**Checks** (:class:`BagError`, naming the bag and the problem; nothing is written): missing
topic, unexpected or undefined message type, bag without ``metadata.yaml`` (recorder never
closed it) or with unreadable data, empty bag, no commands, joint names not matching the
model, command length not matching, clock jumps (joint-state stamps going backwards, or a gap
over ``max_gap_s``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from metarl_ros.control.joint_map import JointNameMapper, RejectedInput
from metarl_ros.control.law import build_observation, effort_command, tracking_reward
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
    bag_is_complete,
    jazzy_typestore,
)
from metarl_ros.sim.env_config import EnvSetup
from metarl_ros.sim.tasks import TaskParams


class BagTopics(StrictModel):
    """Topic names in the bags (``''`` = not recorded / not used)."""

    joint_states: str = "/joint_states"
    commands: str = "/effort_controller/commands"
    reference: str = "/reference"
    task_events: str = Field(default="/sim/true_task",
                             description="true task changes (sim_node); '' = none")


class AlignmentConfig(StrictModel):
    """How streams are put on the control grid and what counts as broken."""

    max_gap_s: PositiveFloat = Field(
        default=0.1, description="a gap between joint-state stamps larger than this is a "
        "clock jump (error)")
    reference_max_age_s: NonNegativeFloat = Field(
        default=0.02, description="newest reference may be this much older than the instant")
    action_tolerance: NonNegativeFloat = Field(
        default=1e-3, description="|a| up to 1 + this counts as a policy action (numerics)")


class SegmentationConfig(StrictModel):
    """Task splitting when a bag has no fault events (posterior change points)."""

    jump_ratio: PositiveFloat = Field(
        default=4.0, description="a change point needs a window-to-window posterior shift this "
        "many times the bag's median shift")
    min_shift: NonNegativeFloat = Field(
        default=1.0, description="... and at least this shift, in posterior std (RMS)")
    min_segment_steps: PositiveInt = Field(default=50,
                                           description="shortest task segment, transitions")


# ------------------------------------------------------------------------------------------
# Data


@dataclass
class TaskEvent:
    """A recorded true task change (sim time, s)."""

    time_s: float
    task: TaskParams
    label: str


@dataclass
class BagTransitions:
    """Transitions rebuilt from one bag, in time order.

    obs/next_obs (M, obs_dim) float32, action (M, act_dim) float32, reward (M,) float32,
    time_s (M,) float64: the control instant of ``s`` on the bag's time axis.
    """

    path: Path
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    time_s: np.ndarray
    step_end_s: np.ndarray
    """(M,) the instant of ``s'`` (a fault striking before it belongs to this step)."""
    events: list[TaskEvent]
    control_instants: int
    start_s: float
    end_s: float
    topics: dict[str, tuple[str, int]]
    """every topic in the bag: (type, messages)."""
    read_messages: int
    dropped: Counter = field(default_factory=Counter)
    """reason -> count (messages, commands, control instants or transitions, as named)."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def __len__(self) -> int:
        return len(self.reward)


@dataclass
class TaskData:
    """Transitions of one task (possibly from several bags); arrays as in BagTransitions."""

    name: str
    task: TaskParams | None
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return len(self.reward)


# ------------------------------------------------------------------------------------------
# Reading


_EXPECTED = {"joint_states": JOINT_STATE, "reference": JOINT_STATE, "commands": FLOAT64_ARRAY,
             "task_events": STRING}


def _open_reader(path: Path):
    from rosbags.highlevel import AnyReader, AnyReaderError

    if not path.exists():
        raise BagError(f"{path}: bag not found")
    if not path.is_dir():
        raise BagError(f"{path}: not a rosbag2 directory")
    if not bag_is_complete(path):
        raise BagError(f"{path}: truncated bag: no metadata.yaml (the recorder did not close "
                       "it); `ros2 bag reindex` can rebuild the metadata of what was written")
    reader = AnyReader([path], default_typestore=jazzy_typestore())
    try:
        reader.open()
    except AnyReaderError as exc:
        raise BagError(f"{path}: truncated or unreadable bag: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - storage layers raise many types on corrupt files
        raise BagError(f"{path}: truncated or unreadable bag: {type(exc).__name__}: "
                       f"{exc}") from None
    return reader


def _check_topics(path: Path, reader, topics: BagTopics) -> dict[str, Any]:
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


class _JointStream:
    """JointState messages of one topic: log times and the bytes, decoded column-wise later
    (:class:`~metarl_ros.recording.bag.JointStateColumns`)."""

    def __init__(self, reader) -> None:
        self.log: list[int] = []
        self.columns = JointStateColumns(fallback=lambda raw: _generic_joint_state(reader, raw))

    def __len__(self) -> int:
        return len(self.log)


@dataclass
class _Streams:
    """Raw per-topic columns read from one bag (before alignment)."""

    states: _JointStream
    references: _JointStream
    cmd_log: list[int] = field(default_factory=list)
    cmd_values: list[tuple] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    read: int = 0


def _read_streams(path: Path, reader, roles: dict[str, Any], progress: bool,
                  dropped: Counter) -> _Streams:
    from tqdm import tqdm

    streams = _Streams(_JointStream(reader), _JointStream(reader))
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


def _map_joint_states(path: Path, topic: str, stream: _JointStream,
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


def _parse_events(path: Path, raw_events: list[tuple[int, str]], n: int,
                  dropped: Counter) -> list[TaskEvent]:
    events = []
    for _, text in raw_events:
        try:
            data = json.loads(text)
            task = TaskParams.from_dict(data["task"]).normalized(n)
            task.validate(n)
            events.append(TaskEvent(float(data["time_s"]), task, str(data.get("label", ""))))
        except (ValueError, KeyError, TypeError):
            dropped["task events: unparseable"] += 1
    events.sort(key=lambda e: e.time_s)
    return events


def _control_grid(stamps: np.ndarray, first: int, period_ns: int) -> np.ndarray:
    """Indices (into time-sorted ``stamps``) on the adapter's control grid from ``first``.

    Same rule as :meth:`AdaptiveController.on_joint_state`: an instant is due when its stamp
    reaches the next grid point (minus 10 % of a period); after a gap the grid restarts.
    """
    chosen = []
    next_due = None
    tolerance = period_ns // 10
    for i in range(first, len(stamps)):
        stamp = int(stamps[i])
        if next_due is not None and stamp < next_due - tolerance:
            continue
        if next_due is None or stamp > next_due + period_ns:
            next_due = stamp
        next_due += period_ns
        chosen.append(i)
    return np.asarray(chosen, dtype=np.int64)


def read_bag(path: str | Path, setup: EnvSetup, joint_names: Sequence[str],
             topics: BagTopics = BagTopics(), alignment: AlignmentConfig = AlignmentConfig(),
             control_rate_hz: float | None = None, progress: bool = False) -> BagTransitions:
    """Read one bag and rebuild its transitions (see the module doc).

    Args:
        path: rosbag2 directory.
        setup: the env the model was trained for (observation, reward, PD feedback, scales).
        joint_names: the model's joint order.
        control_rate_hz: the model's control rate (default: the env's).
    """
    path = Path(path)
    n = len(joint_names)
    if n != setup.act_dim:
        raise BagError(f"model has {n} joints but its env {setup.path} has {setup.act_dim}")
    dropped: Counter = Counter()
    reader = _open_reader(path)
    try:
        roles = _check_topics(path, reader, topics)
        all_topics = {t: (i.msgtype or "?", i.msgcount) for t, i in reader.topics.items()}
        if not sum(c.msgcount for c in roles["commands"]):
            raise BagError(f"{path}: bag has no commands on {topics.commands} (nothing to learn "
                           "actions from)")
        if not sum(c.msgcount for c in roles["joint_states"]):
            raise BagError(f"{path}: bag has no joint states on {topics.joint_states}")
        streams = _read_streams(path, reader, roles, progress, dropped)
    finally:
        reader.close()

    # --- joint states: arrays in model order, time axis, clock checks ------------------
    stamp, q, qd, _, state_ok = _map_joint_states(path, topics.joint_states, streams.states,
                                                  joint_names, False, False, dropped)
    log = np.asarray(streams.states.log, dtype=np.int64)
    if stamp.size and not stamp.any():
        dropped["joint_states: unstamped, log time used"] += stamp.size
        stamp = log.copy()
    _check_clock(path, topics.joint_states, stamp, alignment.max_gap_s)
    keep = np.flatnonzero(state_ok)
    log, stamp, q, qd = log[keep], stamp[keep], q[keep], qd[keep]
    if not len(stamp):
        raise BagError(f"{path}: no usable joint states on {topics.joint_states}")

    # --- reference ----------------------------------------------------------------------
    if not len(streams.references):
        raise BagError(f"{path}: no reference messages on {topics.reference}")
    ref_stamp, rq, rqd, rqdd, ref_ok = _map_joint_states(
        path, topics.reference, streams.references, joint_names, True, True, dropped)
    if not ref_ok.any():
        raise BagError(f"{path}: no usable reference messages on {topics.reference} (see the "
                       f"reasons: {dict(dropped)})")
    if not ref_stamp.any():
        raise BagError(f"{path}: reference messages on {topics.reference} are unstamped; "
                       "the reference of an instant cannot be found")
    order = np.argsort(ref_stamp[ref_ok], kind="stable")
    ref_stamp = ref_stamp[ref_ok][order]
    rq, rqd, rqdd = rq[ref_ok][order], rqd[ref_ok][order], rqdd[ref_ok][order]

    # --- commands -> control instants ----------------------------------------------------
    widths = {len(v) for v in streams.cmd_values}
    if widths and widths != {n}:
        raise BagError(f"{path}: commands on {topics.commands} have {sorted(widths)} values, the "
                       f"model controls {n} joints")
    cmd = np.asarray(streams.cmd_values, dtype=np.float64).reshape(-1, n)
    cmd_log = np.asarray(streams.cmd_log, dtype=np.int64)
    finite = np.isfinite(cmd).all(1)
    if (~finite).any():
        dropped["commands: non-finite"] += int((~finite).sum())
        cmd, cmd_log = cmd[finite], cmd_log[finite]
    if not len(cmd):
        raise BagError(f"{path}: no usable commands on {topics.commands} (see the reasons: "
                       f"{dict(dropped)})")
    rate = control_rate_hz or setup.config.control_rate_hz
    period_ns = int(round(1e9 / rate))
    # process joint states in receipt order (= stamp order, checked above)
    first_state = int(np.searchsorted(log, cmd_log[0], side="right")) - 1
    if first_state < 0:
        first_state = 0
    grid = _control_grid(stamp, first_state, period_ns)
    owner = np.searchsorted(log[grid], cmd_log, side="right") - 1  # grid slot per command
    before = owner < 0
    if before.any():
        dropped["commands: before the first joint state"] += int(before.sum())
    owner_valid = owner[~before]
    cmd = cmd[~before]
    slots, first_cmd = np.unique(owner_valid, return_index=True)
    extra = len(owner_valid) - len(slots)
    if extra:
        dropped["commands: more than one for an instant (first used)"] += extra
    unanswered = len(grid) - len(slots)
    if unanswered:
        dropped["control instants: no command"] += unanswered
    tick = grid[slots]                       # joint-state index of each control instant
    effort = cmd[first_cmd]                  # (K, n)
    t_ns = stamp[tick]
    tq, tqd = q[tick], qd[tick]

    # reference of each instant: newest stamped no later than it, not too old
    ref_index = np.searchsorted(ref_stamp, t_ns + 1000, side="right") - 1
    has_ref = ref_index >= 0
    age = np.where(has_ref, t_ns - ref_stamp[np.maximum(ref_index, 0)], np.iinfo(np.int64).max)
    has_ref &= age <= int(alignment.reference_max_age_s * 1e9) + 1000
    if (~has_ref).any():
        dropped["control instants: no reference for the instant"] += int((~has_ref).sum())
    ri = np.maximum(ref_index, 0)
    ref = (rq[ri], rqd[ri], rqdd[ri])

    # --- actions: invert the shared effort_command ----------------------------------------
    feedback = effort_command(setup.law, np.zeros((len(tick), n)), tq, tqd, ref)
    scale = np.asarray(setup.robot.action_scale, dtype=np.float64)
    action = (effort - feedback) / scale
    limits = np.asarray(setup.robot.effort_limits, dtype=np.float64)
    saturated = (np.abs(effort) >= limits - 1e-9).any(1)
    outside = (np.abs(action) > 1.0 + alignment.action_tolerance).any(1)
    policy = has_ref & ~saturated & ~outside
    if (has_ref & saturated).any():
        dropped["control instants: effort at a limit (action not recoverable)"] += int(
            (has_ref & saturated).sum())
    if (has_ref & ~saturated & outside).any():
        dropped["control instants: command not a residual-policy action (|a| > 1)"] += int(
            (has_ref & ~saturated & outside).sum())
    action = np.clip(action, -1.0, 1.0)

    # --- transitions, exactly as the control loop builds them ------------------------------
    previous = np.zeros_like(action)
    previous[1:] = np.where(policy[:-1, None], action[:-1], 0.0)
    obs = _observations(setup, tq, tqd, ref, previous)
    gap = np.diff(t_ns) if len(t_ns) > 1 else np.zeros(0, dtype=np.int64)
    consecutive = (gap >= period_ns // 2) & (gap <= period_ns * 3 // 2)
    pair = policy[:-1] & has_ref[1:] & consecutive
    broken = (policy[:-1] & has_ref[1:] & ~consecutive).sum()
    if broken:
        dropped["transitions: control instants not one period apart"] += int(broken)
    i = np.flatnonzero(pair)
    next_obs = obs[i + 1]  # built with previous = a_k, since instant k is a policy instant
    rewards = np.asarray([
        tracking_reward(setup.law, float(np.linalg.norm(ref[0][k + 1] - tq[k + 1])), action[k])
        for k in i], dtype=np.float32)
    events = _parse_events(path, streams.events, n, dropped)
    return BagTransitions(
        path=path, obs=obs[i], action=action[i].astype(np.float32), reward=rewards,
        next_obs=next_obs, time_s=t_ns[i] * 1e-9, step_end_s=t_ns[i + 1] * 1e-9,
        events=events, control_instants=len(tick), start_s=float(stamp[0]) * 1e-9,
        end_s=float(stamp[-1]) * 1e-9, topics=all_topics, read_messages=streams.read,
        dropped=dropped)


def _check_clock(path: Path, topic: str, stamp: np.ndarray, max_gap_s: float) -> None:
    """Joint-state stamps, in receipt order, must not go back nor jump forward."""
    if stamp.size < 2:
        return
    step = np.diff(stamp)
    back = np.flatnonzero(step < 0)
    if back.size:
        k = int(back[0])
        raise BagError(f"{path}: clock jump on {topic}: stamp went back from "
                       f"{stamp[k] * 1e-9:.6f} s to {stamp[k + 1] * 1e-9:.6f} s "
                       f"(message {k + 1}); record one run per bag")
    big = np.flatnonzero(step > max_gap_s * 1e9)
    if big.size:
        k = int(big[0])
        raise BagError(f"{path}: clock jump on {topic}: {step[k] * 1e-9:.3f} s gap after "
                       f"t = {stamp[k] * 1e-9:.3f} s (tolerance alignment.max_gap_s = "
                       f"{max_gap_s:g} s)")


def _observations(setup: EnvSetup, position: np.ndarray, velocity: np.ndarray,
                  reference: tuple[np.ndarray, np.ndarray, np.ndarray],
                  previous: np.ndarray) -> np.ndarray:
    """:func:`build_observation` for K instants at once: inputs (K, n) -> (K, obs_dim).

    The shared function is elementwise per block and concatenates its blocks along axis 0;
    given (K, n) arrays it stacks the blocks as (blocks * K, n), which is reordered here into
    one row per instant -- the very same arithmetic as K single calls.
    """
    k, n = position.shape
    if k == 0:
        return np.zeros((0, setup.obs_dim), np.float32)
    stacked = build_observation(setup.law, position, velocity, reference, previous)
    blocks = stacked.shape[0] // k
    return np.ascontiguousarray(stacked.reshape(blocks, k, n).transpose(1, 0, 2).reshape(k, -1))


# ------------------------------------------------------------------------------------------
# Tasks


def split_by_events(bag: BagTransitions) -> list[tuple[TaskParams, str, np.ndarray]]:
    """``(task, label, transition indices)`` per recorded task (needs ``bag.events``).

    A transition belongs to the task in force at the end of its step: a fault that strikes
    during the step (at ``time < step end``) already shaped ``s'``.
    """
    if not bag.events:
        return []
    times = np.asarray([e.time_s for e in bag.events])
    which = np.searchsorted(times, bag.step_end_s - 1e-9, side="left") - 1
    out = []
    for e_index in np.unique(which):
        rows = np.flatnonzero(which == e_index)
        if e_index < 0:  # before the first event: the task is unknown
            continue
        event = bag.events[int(e_index)]
        out.append((event.task, event.label or f"event {e_index}", rows))
    return out


def posterior_change_points(mean: np.ndarray, std: np.ndarray, window: int,
                            config: SegmentationConfig = SegmentationConfig()) -> list[int]:
    """Indices where a new task starts, from a streaming posterior (mean, std: (M, L)).

    Two-window test: the posterior over the window ending at step t (transitions
    ``t-K+1 .. t``) is compared with the one over the window before it (ending at ``t - K``):
    ``d_t = RMS((mu_t - mu_{t-K}) / std_t)``. A task change makes ``d`` peak when the newer
    window holds only the new task and the older one only the old task, i.e. the change is at
    ``t - K + 1``; a peak above ``jump_ratio`` times the median ``d`` (and above
    ``min_shift``) starts a task there. Change points are at least ``min_segment_steps`` apart.
    """
    m = len(mean)
    k = window
    if m < 2 * k + 1:
        return []
    d = np.zeros(m)
    scale = np.maximum(std[k:], 1e-6)
    d[k:] = np.sqrt((((mean[k:] - mean[:-k]) / scale) ** 2).mean(1))
    d[: 2 * k] = 0.0  # the first window is still filling
    threshold = max(config.jump_ratio * float(np.median(d[2 * k:])), config.min_shift)
    points: list[int] = []
    candidates = np.argsort(-d)
    for t in candidates:
        if d[t] <= threshold:
            break
        start = int(t) - k + 1
        if start < config.min_segment_steps or m - start < config.min_segment_steps:
            continue
        if all(abs(start - p) >= config.min_segment_steps for p in points):
            points.append(start)
    return sorted(points)


def streaming_posterior(encoder, bag: BagTransitions,
                        window: int) -> tuple[np.ndarray, np.ndarray]:
    """The deployed posterior over each bag position: mean, std (M, L).

    Equal to :class:`~metarl_ros.learning.encoder.StreamingPosterior` fed the transitions in
    order (product of the last ``window`` factors), computed with cumulative sums.
    """
    import torch

    from metarl_ros.learning.encoder import make_transition

    with torch.no_grad():
        transitions = make_transition(torch.from_numpy(bag.obs), torch.from_numpy(bag.action),
                                      torch.from_numpy(bag.reward), torch.from_numpy(bag.next_obs))
        mu, var = encoder.factors(transitions)
    precision = (1.0 / var).double().numpy()
    weighted = (mu.double() / var.double()).numpy()
    cp = np.vstack([np.zeros((1, precision.shape[1])), np.cumsum(precision, 0)])
    cw = np.vstack([np.zeros((1, weighted.shape[1])), np.cumsum(weighted, 0)])
    end = np.arange(1, len(precision) + 1)
    start = np.maximum(end - window, 0)
    p = cp[end] - cp[start]
    w = cw[end] - cw[start]
    return w / p, np.sqrt(1.0 / p)


def build_tasks(bags: Sequence[BagTransitions], encoder=None, window: int = 25,
                segmentation: SegmentationConfig = SegmentationConfig()
                ) -> tuple[list[TaskData], dict[str, str]]:
    """Group transitions into tasks; returns the tasks and, per bag, how it was split.

    Bags with fault events are split at them, equal tasks merged across bags. Other bags are
    split at posterior change points when an ``encoder`` is given, else kept whole.
    """
    by_key: dict[str, TaskData] = {}
    order: list[str] = []
    how: dict[str, str] = {}

    def add(key: str, name: str, task: TaskParams | None, bag: BagTransitions,
            rows: np.ndarray) -> None:
        if key not in by_key:
            by_key[key] = TaskData(name, task, bag.obs[rows], bag.action[rows], bag.reward[rows],
                                   bag.next_obs[rows], [str(bag.path)])
            order.append(key)
            return
        data = by_key[key]
        data.obs = np.concatenate([data.obs, bag.obs[rows]])
        data.action = np.concatenate([data.action, bag.action[rows]])
        data.reward = np.concatenate([data.reward, bag.reward[rows]])
        data.next_obs = np.concatenate([data.next_obs, bag.next_obs[rows]])
        if str(bag.path) not in data.sources:
            data.sources.append(str(bag.path))

    for b, bag in enumerate(bags):
        if not len(bag):
            how[str(bag.path)] = "no transitions"
            continue
        parts = split_by_events(bag)
        if parts:
            how[str(bag.path)] = f"fault events ({len(parts)} tasks)"
            for task, label, rows in parts:
                add(task.key(), label, task, bag, rows)
            continue
        points: list[int] = []
        if encoder is not None:
            mean, std = streaming_posterior(encoder, bag, window)
            points = posterior_change_points(mean, std, window, segmentation)
            how[str(bag.path)] = f"posterior change points ({len(points) + 1} segments)"
        else:
            how[str(bag.path)] = "no events, no encoder: one task"
        bounds = [0, *points, len(bag)]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            add(f"bag{b}:segment{s}", f"{bag.path.name} segment {s}", None, bag,
                np.arange(lo, hi))
    return [by_key[k] for k in order], how
