"""Joint names of the model vs joint names of the robot (the ``joint_map`` node parameter).

A model is trained on the simulated robot's joint names (its contract's ``joint_names``); the
real robot's drivers may call the same joints differently (``arm_joint_1`` for
``lbr_iiwa_joint_1``) and its controller may list them in another order. :class:`JointMap`
renames incoming joint names to the model's and orders outgoing commands for the controller:

* ``pairs``: ``"model_name:robot_name"`` strings; model joints not listed keep their name.
* incoming (``/joint_states``, ``/reference``): robot names are renamed to model names; any
  other name in the message is marked unmapped, so it can never stand in for a model joint
  (the control loop then ignores it, as it ignores every extra joint).
* outgoing: :meth:`JointMap.command_order` gives, for the controller's joint list (robot
  names, the order of its ``joints`` parameter), the model index of each entry --
  ``std_msgs/Float64MultiArray`` commands are matched to the controller's joints by position.

Also here, ROS-free for the launch graphs: the command types and their topics
(:data:`COMMAND_TYPES`, :func:`command_topic`; the publishers are
:mod:`metarl_ros.nodes.commands`).

Pure Python (no ROS), so it is tested without DDS. Errors are
:class:`~metarl_ros.core.schema.ConfigError` naming the offending entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from metarl_ros.core.schema import ConfigError

_UNMAPPED = " (not in joint_map)"

#: ``effort``: std_msgs/Float64MultiArray for a forward_command_controller; ``trajectory``:
#: a one-point trajectory_msgs/JointTrajectory for a joint_trajectory_controller.
COMMAND_TYPES: tuple[str, ...] = ("effort", "trajectory", "impedance")
_TOPIC_SUFFIX = {"effort": "commands", "trajectory": "joint_trajectory",
                 "impedance": "joint_trajectory"}


def command_topic(controller: str, command_type: str) -> str:
    """``/<controller>/commands`` (effort) or ``/<controller>/joint_trajectory``
    (trajectory, impedance)."""
    if command_type not in _TOPIC_SUFFIX:
        raise ValueError(f"command_type {command_type!r}: expected one of "
                         f"{', '.join(COMMAND_TYPES)}")
    return f"/{controller.strip('/')}/{_TOPIC_SUFFIX[command_type]}"


class JointMap:
    """Rename between model joint names and robot joint names.

    Args:
        model_joints: the model's joint names, in the model's (contract) order.
        pairs: ``"model_name:robot_name"`` entries; empty = the robot uses the model's names.
    """

    def __init__(self, model_joints: Sequence[str], pairs: Sequence[str] = ()) -> None:
        self.model_names: tuple[str, ...] = tuple(model_joints)
        mapping: dict[str, str] = {}
        for entry in pairs:
            model, sep, robot = entry.partition(":")
            model, robot = model.strip(), robot.strip()
            if not sep or not model or not robot:
                raise ConfigError(f"joint_map entry {entry!r}: expected 'model_joint:robot_joint'")
            if model not in self.model_names:
                raise ConfigError(f"joint_map entry {entry!r}: {model!r} is not a joint of the "
                                  f"model (its joints: {', '.join(self.model_names)})")
            if model in mapping:
                raise ConfigError(f"joint_map maps model joint {model!r} twice")
            mapping[model] = robot
        self.robot_names: tuple[str, ...] = tuple(mapping.get(n, n) for n in self.model_names)
        """robot name of each model joint, in model order."""
        if len(set(self.robot_names)) != len(self.robot_names):
            repeated = sorted({n for n in self.robot_names if self.robot_names.count(n) > 1})
            raise ConfigError(f"joint_map gives two model joints the same robot name: "
                              f"{', '.join(repeated)}")
        self.identity = self.robot_names == self.model_names
        self._to_model = dict(zip(self.robot_names, self.model_names))
        self._cache_key: tuple[str, ...] | None = None
        self._cache_value: list[str] = []

    def to_model(self, names: Sequence[str]) -> Sequence[str]:
        """A message's joint names (robot names) as model names; others marked unmapped.

        Cached for the last name list seen (drivers repeat the same list every message).
        """
        if self.identity:
            return names
        key = tuple(names)
        if key != self._cache_key:
            self._cache_value = [self._to_model.get(n, n + _UNMAPPED) for n in key]
            self._cache_key = key
        return self._cache_value

    def command_order(self, controller_joints: Sequence[str] = ()) -> tuple[tuple[str, ...],
                                                                            np.ndarray]:
        """``(robot names in command order, model index of each)`` for a controller.

        ``controller_joints`` (robot names) is the controller's ``joints`` list; empty = the
        model's order. It must name exactly the model's joints, each once.
        """
        if not controller_joints:
            return self.robot_names, np.arange(len(self.model_names))
        names = tuple(controller_joints)
        where = {name: i for i, name in enumerate(self.robot_names)}
        unknown = [n for n in names if n not in where]
        missing = [n for n in self.robot_names if n not in names]
        if unknown or missing or len(set(names)) != len(names):
            raise ConfigError(
                f"controller_joints {list(names)} must list each robot joint "
                f"{list(self.robot_names)} exactly once"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else ""))
        return names, np.array([where[n] for n in names], dtype=np.int64)


class RejectedInput(ValueError):
    """An input message was not used. ``reason`` is a short machine-readable key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class JointSample:
    """One reading mapped to the contract's joint order; each array shape (n,)."""

    position: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray | None = None


class JointNameMapper:
    """Map ``sensor_msgs/JointState``-like data onto a fixed joint order, by name.

    Args:
        joint_names: the order the policy expects (the contract's ``joint_names``).
        allow_unnamed: accept a message without names if its arrays have exactly ``n``
            entries, taken in contract order (used for the simulator's ``/reference``).
        max_entries: messages with more names or values than this are rejected
            (``too_many_entries``) before any per-entry work, so one huge message cannot stall
            the control loop.
    """

    def __init__(self, joint_names: Sequence[str], allow_unnamed: bool = False,
                 max_entries: int = 1024) -> None:
        if len(set(joint_names)) != len(joint_names) or not joint_names:
            raise ValueError(f"joint_names must be non-empty and unique, got {joint_names}")
        self.joint_names = tuple(joint_names)
        self.allow_unnamed = allow_unnamed
        self.max_entries = max(int(max_entries), len(self.joint_names))
        self._cache_key: tuple[str, ...] | None = None
        self._cache_index: np.ndarray | None = None

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def _index(self, names: Sequence[str]) -> np.ndarray:
        key = tuple(names)
        if key == self._cache_key and self._cache_index is not None:
            return self._cache_index
        if len(set(key)) != len(key):
            raise RejectedInput("duplicate_names", f"joint names repeat: {list(key)}")
        where = {name: i for i, name in enumerate(key)}
        missing = [name for name in self.joint_names if name not in where]
        if missing:
            raise RejectedInput("missing_joints", f"message lacks joints {missing}")
        index = np.array([where[name] for name in self.joint_names], dtype=np.int64)
        self._cache_key, self._cache_index = key, index
        return index

    def map(
        self,
        names: Sequence[str],
        position: Sequence[float],
        velocity: Sequence[float],
        effort: Sequence[float] | None = None,
        require_effort: bool = False,
    ) -> JointSample:
        """Return the contract joints' values; raise :class:`RejectedInput` if unusable.

        ``position`` and ``velocity`` must have one entry per name; ``effort`` may be empty
        (it is then ``None`` in the result) unless ``require_effort``. Only the contract's
        joints are checked for finiteness: a NaN on an ignored extra joint does not matter.
        """
        n_names = len(names)
        longest = max(n_names, len(position), len(velocity),
                      0 if effort is None else len(effort))
        if longest > self.max_entries:
            raise RejectedInput("too_many_entries", f"{longest} entries, more than the "
                                f"{self.max_entries} accepted per message")
        if n_names == 0:
            if not self.allow_unnamed:
                raise RejectedInput("no_names", "message has no joint names")
            n_names = self.num_joints
            index = np.arange(self.num_joints)
        else:
            index = self._index(names)
        if len(position) != n_names:
            raise RejectedInput(
                "length_mismatch", f"{n_names} names but {len(position)} positions"
            )
        if len(velocity) != n_names:
            raise RejectedInput(
                "length_mismatch", f"{n_names} names but {len(velocity)} velocities"
            )
        has_effort = effort is not None and len(effort) > 0
        if has_effort and len(effort) != n_names:
            raise RejectedInput("length_mismatch", f"{n_names} names but {len(effort)} efforts")
        if require_effort and not has_effort:
            raise RejectedInput("length_mismatch", "message has no effort entries")
        pos = np.asarray(position, dtype=np.float64)[index]
        vel = np.asarray(velocity, dtype=np.float64)[index]
        eff = np.asarray(effort, dtype=np.float64)[index] if has_effort else None
        finite = np.isfinite(pos).all() and np.isfinite(vel).all()
        if eff is not None:
            finite = finite and bool(np.isfinite(eff).all())
        if not finite:
            raise RejectedInput("non_finite", "non-finite value on a controlled joint")
        return JointSample(pos, vel, eff)
