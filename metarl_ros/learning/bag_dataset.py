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
(:func:`~metarl_ros.learning.bag_tasks.posterior_change_points`).

**Checks** (:class:`BagError`, naming the bag and the problem; nothing is written): missing
topic, unexpected or undefined message type, empty bag folder, bag without ``metadata.yaml``
(recorder never closed it: ``metarl bag repair`` recovers it) or with unreadable data, empty
bag, no commands, joint names not matching the
model, command length not matching, clock jumps (joint-state stamps going backwards, or a gap
over ``max_gap_s``).

Reading is in :mod:`~metarl_ros.learning.bag_streams`, the containers and the task
grouping in :mod:`~metarl_ros.learning.bag_tasks`; this module aligns the streams.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveFloat

from metarl_ros.control.law import build_observation, effort_command, tracking_reward
from metarl_ros.core.schema import StrictModel
from metarl_ros.learning.bag_streams import (
    BagTopics,
    check_topics,
    map_joint_states,
    open_reader,
    read_streams,
)
from metarl_ros.learning.bag_tasks import BagTransitions, TaskEvent
from metarl_ros.recording.bag import BagError
from metarl_ros.sim.env_config import EnvSetup
from metarl_ros.sim.tasks import TaskParams


class AlignmentConfig(StrictModel):
    """How streams are put on the control grid and what counts as broken."""

    max_gap_s: PositiveFloat = Field(
        default=0.1, description="a gap between joint-state stamps larger than this is a "
        "clock jump (error)")
    reference_max_age_s: NonNegativeFloat = Field(
        default=0.02, description="newest reference may be this much older than the instant")
    action_tolerance: NonNegativeFloat = Field(
        default=1e-3, description="|a| up to 1 + this counts as a policy action (numerics)")



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
    reader = open_reader(path)
    try:
        roles = check_topics(path, reader, topics)
        all_topics = {t: (i.msgtype or "?", i.msgcount) for t, i in reader.topics.items()}
        if not sum(c.msgcount for c in roles["commands"]):
            raise BagError(f"{path}: bag has no commands on {topics.commands} (nothing to learn "
                           "actions from)")
        if not sum(c.msgcount for c in roles["joint_states"]):
            raise BagError(f"{path}: bag has no joint states on {topics.joint_states}")
        streams = read_streams(path, reader, roles, progress, dropped)
    finally:
        reader.close()

    # --- joint states: arrays in model order, time axis, clock checks ------------------
    stamp, q, qd, _, state_ok = map_joint_states(path, topics.joint_states, streams.states,
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
    ref_stamp, rq, rqd, rqdd, ref_ok = map_joint_states(
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
