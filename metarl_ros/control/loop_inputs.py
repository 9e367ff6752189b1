"""The control loop's inputs: joint states and references mapped to the policy's joints by name,
stamp-checked, and watched for staleness.

A message's stamp is its header stamp, or its receipt time if the stamp is unset (0).
Staleness is measured on the caller's clock from the *receipt* of the latest accepted joint
state and reference; an input that has not arrived yet counts from the first receipt of the
other one (so a reference following its joint state by a few milliseconds at start-up is not
"stale"). Inputs that keep arriving but are rejected (e.g. for their stamps) are named as the
cause, not silence.

References may arrive ahead of the instant they are for (a *preview*: a planner knows where
the arm should be next). The latest :data:`REFERENCE_BUFFER` are kept, and the reference of an
instant is the newest stamped no later than it (:meth:`LoopInputs.reference_at`), the rule
:mod:`metarl_ros.learning.bag_dataset` applies to recorded bags.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import numpy as np

from metarl_ros.control.joint_map import JointNameMapper, JointSample, RejectedInput
from metarl_ros.control.loop_types import LoopConfig
from metarl_ros.control.tick_timing import check_stamp
from metarl_ros.control.watchdog import Watchdog

REFERENCE_BUFFER = 64
"""References kept for :meth:`LoopInputs.reference_at` (0.128 s of a 500 Hz stream)."""


class LoopInputs:
    """The latest accepted joint state and reference of
    :class:`~metarl_ros.control.controller.AdaptiveController`.

    Args:
        names: the policy's joint order.
        config: the loop's settings (message size and stamp offset limits, watchdog timeout).
        on_reject: called with ``(kind, error)`` for each rejected message (``kind``:
            ``joint_state`` or ``reference``).
    """

    def __init__(self, names: Sequence[str], config: LoopConfig,
                 on_reject: Callable[[str, RejectedInput], None]) -> None:
        self.joints = JointNameMapper(names, max_entries=config.max_message_joints)
        self.references = JointNameMapper(names, allow_unnamed=True,
                                          max_entries=config.max_message_joints)
        self.joint_watchdog = Watchdog(config.watchdog_timeout_s)
        self.reference_watchdog = Watchdog(config.watchdog_timeout_s)
        self.max_stamp_offset_s = config.max_stamp_offset_s
        self._on_reject = on_reject
        self.sample: JointSample | None = None
        """the latest accepted joint state."""
        self.reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        """the latest accepted reference: q_ref, qd_ref, qdd_ref."""
        self._references: deque[tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray]]] = \
            deque(maxlen=REFERENCE_BUFFER)
        self.last_rejection: dict[str, tuple[float, RejectedInput]] = {}
        """per kind: receipt time and error of the latest rejected message."""

    def take_joint_state(self, stamp_s: float, now_s: float, names: Sequence[str],
                         position: Sequence[float], velocity: Sequence[float],
                         effort: Sequence[float] | None = None) -> float:
        """Accept a joint state received at ``now_s``; returns its stamp. Raises
        :class:`RejectedInput` (after reporting it) if it is unusable; nothing changes then."""
        self.sample, stamp = self._accept("joint_state", self.joints, stamp_s, now_s, names,
                                          position, velocity, effort)
        self.joint_watchdog.feed(now_s)
        self.reference_watchdog.arm(now_s)  # from now on a missing reference goes stale
        return stamp

    def take_reference(self, stamp_s: float, now_s: float, names: Sequence[str],
                       position: Sequence[float], velocity: Sequence[float],
                       acceleration: Sequence[float]) -> float:
        """Accept a reference (q_ref, qd_ref, qdd_ref), as :meth:`take_joint_state`."""
        sample, stamp = self._accept("reference", self.references, stamp_s, now_s, names,
                                     position, velocity, acceleration, require_effort=True)
        assert sample.effort is not None
        self.reference = (sample.position, sample.velocity, sample.effort)
        if self._references and stamp < self._references[-1][0]:
            self._references.clear()  # stamps went back (a restarted publisher): start over
        self._references.append((stamp, self.reference))
        self.reference_watchdog.feed(now_s)
        self.joint_watchdog.arm(now_s)
        return stamp

    def _accept(self, kind: str, mapper: JointNameMapper, stamp_s: float, now_s: float,
                *values, **options) -> tuple[JointSample, float]:
        stamp = stamp_s if stamp_s > 0.0 else now_s
        try:
            sample = mapper.map(*values, **options)
            check_stamp(kind.replace("_", " "), stamp, now_s, self.max_stamp_offset_s)
        except RejectedInput as error:
            self.reject(kind, now_s, error)
            raise
        return sample, stamp

    def reject(self, kind: str, now_s: float, error: RejectedInput) -> None:
        """Report a ``kind`` message (``joint_state`` or ``reference``) received at ``now_s`` as
        unusable, e.g. one that could not even be read: counted and, while no accepted one
        follows, named as the cause of the safe action."""
        self.last_rejection[kind] = (now_s, error)
        self._on_reject(kind, error)

    def reference_at(self, stamp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The reference of the instant ``stamp``: the newest kept one stamped no later than it
        (1 ns of slack), else the earliest kept (every one is ahead: start-up with a preview);
        None before any. Kept references are in arrival order, stamps non-decreasing."""
        if not self._references:
            return None
        for ref_stamp, reference in reversed(self._references):
            if ref_stamp <= stamp + 1e-9:
                return reference
        return self._references[0][1]

    @property
    def newest_reference_stamp(self) -> float | None:
        """The stamp of the newest kept reference (None before any)."""
        return self._references[-1][0] if self._references else None

    def ever_arrived(self) -> bool:
        """Whether any input has arrived, accepted or rejected."""
        return not (self.joint_watchdog.last_s is None and self.reference_watchdog.last_s is None
                    and not self.last_rejection)

    def stale_reason(self, now_s: float) -> tuple[str, str]:
        """``(reason, detail)`` of the safe action stale inputs call for now (``sensor_stale``,
        ``reference_stale`` or ``stamp_offset``); ``("", "")`` while both are fresh."""
        for kind, dog, stale in (("joint_state", self.joint_watchdog, "sensor_stale"),
                                 ("reference", self.reference_watchdog, "reference_stale")):
            if not dog.stale(now_s):
                continue
            what = kind.replace("_", " ")
            rejected = self.last_rejection.get(kind)
            if rejected is not None and (dog.last_s is None or rejected[0] >= dog.last_s):
                # the latest one to arrive was rejected: that, not silence, is the cause
                when, error = rejected
                reason = "stamp_offset" if error.reason == "stamp_offset" else stale
                ago = (f" (received {now_s - when:.3f} s ago)" if now_s - when > dog.timeout_s
                       else "")
                return reason, f"the latest {what}{ago} was rejected: {error}"
            if dog.last_s is None and dog.armed_s is None:
                return stale, f"no {what} received yet"
            return stale, f"no {what} for {dog.age(now_s):.3f} s"
        return "", ""
