"""When the control loop ticks: the stamp grid, the wait for the reference, resynchronisation.

**Timing model.** Control is *sensor-triggered*: a tick runs when a joint state arrives whose
stamp reaches the next point of a grid spaced one control period apart (joint states faster
than the control rate are decimated; slower ones make the loop run at their rate). With
``reference_sync`` the tick also waits for a reference stamped no earlier than that joint
state, so in lockstep simulation the result does not depend on which of the two messages
arrives first.

**Bad stamps never silence the loop.** A stamp farther than ``max_stamp_offset_s`` from the
caller's clock is rejected (:func:`check_stamp`, reason ``stamp_offset``, with a hint when one
side looks like simulated time and the other like wall-clock time: a ``use_sim_time``
mismatch), so the watchdog commands the safe action and says why. A stamp older than the last
tick's resets the tick grid (counted in ``stamp_jumps``), and so does a stamp grid that has
decimated every joint state for more than 1.5 control periods of the caller's clock, so a
single stamp from the future cannot make the loop skip the good messages that follow. A tick
waiting for its reference (``reference_sync``) longer than the watchdog timeout gives the safe
action too (:meth:`TickTiming.reference_behind`).

Times are in seconds (float) on the caller's clock.
"""

from __future__ import annotations

from typing import Callable

from metarl_ros.control.joint_map import RejectedInput


STAMP_SLACK_S = 1e-6
"""Stamps this close are the same instant (float seconds of integer-nanosecond stamps)."""


class TickTiming:
    """The tick grid of :class:`~metarl_ros.control.controller.AdaptiveController`.

    Args:
        period_s: the control period.
        reference_sync: a tick waits for a reference stamped no earlier than its joint state.
        on_jump: called with a description each time the grid is reset (stamps went back or
            stopped fitting it).
    """

    def __init__(self, period_s: float, reference_sync: bool,
                 on_jump: Callable[[str], None]) -> None:
        self.period_s = period_s
        self.reference_sync = reference_sync
        self._on_jump = on_jump
        self.next_due: float | None = None
        self.last_tick_stamp: float | None = None
        """stamp of the instant the latest tick answered."""
        self.last_tick_now: float | None = None
        self.pending_stamp: float | None = None
        """stamp of the joint state a due tick answers (None: no tick due)."""
        self.pending_since: float | None = None
        self.reference_stamp: float | None = None
        self._known_for: float | None = None
        """the instant :meth:`reference_known_for` last gave."""

    def on_joint_state(self, stamp: float, now_s: float) -> bool:
        """An accepted joint state stamped ``stamp``, received at ``now_s``: True if the tick
        it makes due can run now (its reference is there)."""
        last = self.last_tick_stamp
        if last is not None and stamp < last:
            self._jump(f"joint state stamps went back {last - stamp:.3f} s "
                       f"(from {last:.3f} s to {stamp:.3f} s)")
        elif self.next_due is not None and stamp < self.next_due - 0.1 * self.period_s:
            if self.last_tick_now is None or now_s - self.last_tick_now < 1.5 * self.period_s:
                return False  # decimated: not yet the next control instant
            self._jump(f"joint state stamp {stamp:.3f} s is {self.next_due - stamp:.3f} s "
                       f"before the next control instant after "
                       f"{now_s - self.last_tick_now:.3f} s without a tick")
        if self.next_due is None or stamp > self.next_due + self.period_s:
            self.next_due = stamp  # first tick, or resynchronise after a gap
        self.next_due += self.period_s
        if self.pending_stamp is None:
            self.pending_since = now_s
        self.pending_stamp = stamp
        return self.reference_ready()

    def _jump(self, what: str) -> None:
        """The stamp grid no longer fits the stamps: start a new one at this message."""
        self.next_due = None
        self._on_jump(what)

    def on_reference(self, stamp: float) -> bool:
        """An accepted reference stamped ``stamp``: True if a deferred tick can run now."""
        self.reference_stamp = stamp
        return self.pending_stamp is not None and self.reference_ready()

    def reference_known_for(self, newest: float, again: bool = False) -> float | None:
        """The instant whose reference can be prepared now that the newest reference is
        stamped ``newest``, or None. A tick uses the newest reference stamped no later than
        its joint state (:meth:`LoopInputs.reference_at`), so the next control instant's
        reference is known once one stamped at it (within :data:`STAMP_SLACK_S`) or after it
        has arrived; each instant is given once (``again``: even if it was given before).
        While a tick waits for its reference, its joint state's instant; before the first
        tick (no grid yet), ``newest``. Lets the loop prepare what depends on the reference
        alone before the joint state arrives; a reference that arrives only after its joint
        state costs time, never correctness (the tick prepares its own)."""
        if self.pending_stamp is not None:
            return self.pending_stamp
        if self.next_due is None:
            return newest
        due = self.next_due
        if newest < due - STAMP_SLACK_S or (self._known_for == due and not again):
            return None
        self._known_for = due
        return due

    def reference_ready(self) -> bool:
        if self.reference_stamp is None:
            return False
        if not self.reference_sync or self.pending_stamp is None:
            return True
        return self.reference_stamp >= self.pending_stamp - 1e-9

    def start_tick(self, now_s: float) -> tuple[float, float | None]:
        """A tick runs at ``now_s``: ``(stamp it answers, previous tick's stamp)``."""
        stamp = self.pending_stamp if self.pending_stamp is not None else now_s
        self.pending_stamp = None
        self.pending_since = None
        previous = self.last_tick_stamp
        self.last_tick_stamp = stamp
        self.last_tick_now = now_s
        return stamp, previous

    def reference_behind(self, now_s: float, timeout_s: float) -> str:
        """Why the due tick has waited longer than ``timeout_s`` for its reference, or ''."""
        if (self.pending_stamp is None or self.pending_since is None
                or not now_s - self.pending_since > timeout_s):
            return ""
        behind = ("none" if self.reference_stamp is None
                  else f"{self.pending_stamp - self.reference_stamp:.3f} s behind")
        return (f"the tick at {self.pending_stamp:.3f} s has waited "
                f"{now_s - self.pending_since:.3f} s for a reference stamped no earlier "
                f"(latest reference: {behind}; reference_sync)")

    def give_up(self) -> None:
        """The due tick was answered with the safe action: no longer due."""
        self.pending_stamp = self.pending_since = None


def check_stamp(kind: str, stamp: float, now_s: float, limit: float) -> None:
    """Raise :class:`RejectedInput` (``stamp_offset``) if ``stamp`` is farther than ``limit``
    from ``now_s`` (``limit`` 0: no check)."""
    if limit > 0.0 and abs(stamp - now_s) > limit:
        raise RejectedInput("stamp_offset", describe_stamp_offset(kind, stamp, now_s, limit))


def describe_stamp_offset(kind: str, stamp: float, now_s: float, limit: float) -> str:
    """Why a stamp is too far from the node's clock, naming a likely ``use_sim_time`` mix-up.

    Wall-clock stamps are > 1e9 s (after 2001); simulated time starts near 0.
    """
    offset = stamp - now_s
    text = (f"{kind} stamp {stamp:.3f} s is {abs(offset):.4g} s "
            f"{'ahead of' if offset > 0 else 'behind'} this node's clock ({now_s:.3f} s; "
            f"max_stamp_offset {limit:g} s)")
    wall = 1e9
    if now_s == 0.0:
        return text + ("; this node's clock is at 0: use_sim_time is on but no /clock has "
                       "arrived")
    if stamp < wall <= now_s:
        return text + ("; the publisher stamps simulated time (/clock) but this node runs on "
                       "wall-clock time: start it with use_sim_time:=true")
    if now_s < wall <= stamp:
        return text + ("; the publisher stamps wall-clock time but this node runs on simulated "
                       "time (use_sim_time:=true): start it without use_sim_time, or make the "
                       "publisher follow /clock")
    return text
