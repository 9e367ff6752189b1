"""When a simulator driven by an external controller steps, and with which command.

* :class:`CommandMailbox` -- the latest effort command, shared by the thread that receives
  commands and the simulation thread. In **lockstep** the simulator publishes an instant, then
  waits for the command answering it (:meth:`CommandMailbox.wait_newer`); a command tagged with
  the instant it answers is ignored unless it answers the instant being waited for and is the
  first answer to it (a late duplicate answer to a re-published instant must not be taken as
  the answer to the next one). In **real time** the latest valid command is held, and one older
  than a timeout (simulated seconds) gives zero effort (:meth:`CommandMailbox.current`).
* :class:`WallClockPacer` -- real time: physics step by physics step against the wall clock at
  a real-time factor, and the factor achieved.

ROS-free: :mod:`metarl_ros.nodes.sim_node` turns messages and parameters into these calls.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from metarl_ros.sim.arm_sim import ArmSimulation


class CommandMailbox:
    """The latest command (``n`` values: efforts in N*m, or any fixed-size command vector
    whose all-zero value means "no command") and its counters; thread-safe.

    Args:
        n: values per command.
        lockstep: lockstep (tagged commands must answer the awaited instant) or real time.
        clock: the simulated time (s) now, stamped on each command taken.
    """

    def __init__(self, n: int, lockstep: bool, clock: Callable[[], float]) -> None:
        self.n = n
        self.lockstep = lockstep
        self._clock = clock
        self.cond = threading.Condition()
        self.command = np.zeros(n)
        self.seq = 0
        """commands taken so far (an answer is a command newer than the instant's ``seq``)."""
        self.time_s = -np.inf
        self.awaiting_ns: int | None = None
        """lockstep: the instant being answered (None: answered or given up)."""
        self.received = 0
        self.rejected = 0
        self.ignored = 0

    def put(self, values: np.ndarray, tag_ns: int | None) -> bool | None:
        """Take a command (``tag_ns``: the instant it answers, if tagged). Returns None if it
        was ignored, else whether it was valid (an invalid one is replaced by zero effort)."""
        valid = values.shape == (self.n,) and bool(np.isfinite(values).all())
        with self.cond:
            if self.lockstep and tag_ns is not None and tag_ns != self.awaiting_ns:
                self.ignored += 1  # answers an instant already answered or stepped
                return None
            if self.lockstep:
                self.awaiting_ns = None  # answered: a second answer to it is ignored
            self.received += 1
            if valid:
                self.command = values
            else:
                self.rejected += 1
                self.command = np.zeros(self.n)
            self.seq += 1
            self.time_s = self._clock()
            self.cond.notify_all()
        return valid

    def await_answer(self, stamp_ns: int) -> int:
        """Instant ``stamp_ns`` is being published: wait for its answer from now on. Returns
        the command sequence number before it (an answer is a command newer than that)."""
        with self.cond:
            self.awaiting_ns = stamp_ns
            return self.seq

    def wait_newer(self, seq: int, timeout_s: float,
                   stop: threading.Event) -> np.ndarray | None:
        """Block until a command newer than ``seq`` arrives; None on timeout or ``stop``."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.seq <= seq and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            # this instant is answered (or given up): later answers to it are ignored
            self.awaiting_ns = None
            if self.seq > seq:
                return self.command.copy()
            return None

    def latest(self) -> np.ndarray:
        with self.cond:
            return self.command.copy()

    def current(self, timeout_s: float) -> np.ndarray:
        """The command to apply now: zero effort if older than ``timeout_s`` (> 0)."""
        with self.cond:
            age = self._clock() - self.time_s
            if timeout_s > 0 and age > timeout_s:
                return np.zeros(self.n)
            return self.command.copy()

    def wake(self) -> None:
        """Wake a waiting :meth:`wait_newer` (to see its ``stop``)."""
        with self.cond:
            self.cond.notify_all()


class WallClockPacer:
    """Physics against the wall clock at ``real_time_factor`` (simulated s per wall s)."""

    def __init__(self, real_time_factor: float) -> None:
        self.real_time_factor = real_time_factor
        self.overruns = 0
        """times the schedule fell more than a physics step behind and was reset."""
        self.wall_start: float | None = None
        self._next_wall = 0.0
        self._time_at_start = 0.0
        self._repace = threading.Event()

    def start(self, sim_time_s: float) -> None:
        """The simulation starts stepping now, at ``sim_time_s``."""
        self.wall_start = time.monotonic()
        self._time_at_start = sim_time_s
        self._next_wall = self.wall_start

    def set_real_time_factor(self, value: float) -> None:
        """Use ``value`` from the next chunk on, restarting the wall-clock schedule."""
        self.real_time_factor = value
        self._repace.set()

    def run(self, sim: ArmSimulation, steps: int, command: Callable[[], np.ndarray],
            stop: threading.Event,
            step: Callable[[np.ndarray, int], list] | None = None) -> list:
        """``steps`` physics steps, each with ``command()`` (the newest); the fault events.
        ``step(command, substeps)`` applies a command (default ``sim.step``: efforts).

        Each physics step takes the newest command, so a command counts from the physics step
        after it arrives (as on a real robot), not from the next publication. Falling behind
        by more than a step resets the schedule (counted as an overrun) instead of catching
        up in a burst: the achieved real-time factor drops, as in Gazebo.
        """
        events = []
        if self._repace.is_set():
            self._repace.clear()
            self.wall_start = self._next_wall = time.monotonic()
            self._time_at_start = sim.time_s
        step_wall = sim.dt / self.real_time_factor
        step = step or sim.step
        for _ in range(steps):
            events += step(command(), 1)
            self._next_wall += step_wall
            delay = self._next_wall - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            elif delay < -step_wall:
                self.overruns += 1
                self._next_wall = time.monotonic()
            if stop.is_set():
                break
        return events

    def achieved(self, sim_time_s: float) -> float:
        """Simulated seconds per wall second since the start (or the last change of factor)."""
        if self.wall_start is None:
            return 0.0
        wall = time.monotonic() - self.wall_start
        return (sim_time_s - self._time_at_start) / wall if wall > 0 else 0.0
