"""Run a node's low-priority timer work right after a control tick, not when its timer fires.

With a single-threaded executor every callback runs on one thread, so a joint state that
arrives while the diagnostics callback builds and publishes its ~40 values (a millisecond or
two in Python) waits for it, and so does the command it triggers: at 5 Hz that is about one
tick in a hundred, the whole p99 of the sensor-to-command latency. Work that is not
time-critical (the context update and latent, diagnostics) is therefore queued by its timer
and run right after the next tick's command is published -- where the next tick is furthest
away. While no ticks come (no inputs, safe action, a paused simulation), it runs at once.
"""

from __future__ import annotations

import time
from typing import Callable


class AfterTick:
    """Queue of low-priority jobs run after a tick (module docstring).

    Args:
        idle_after_s: no tick for this long (wall time): jobs run when submitted.
        enabled: False runs every job when submitted (e.g. a multi-threaded executor, where
            the jobs have threads of their own).
        clock: monotonic wall time (s).
    """

    def __init__(self, idle_after_s: float, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_after_s = idle_after_s
        self.enabled = enabled
        self._clock = clock
        self._last_tick: float | None = None
        self._pending: dict[str, Callable[[], None]] = {}

    def _ticking(self) -> bool:
        return (self.enabled and self._last_tick is not None
                and self._clock() - self._last_tick <= self.idle_after_s)

    def submit(self, name: str, job: Callable[[], None]) -> None:
        """Run ``job`` after the next tick (replacing a pending job of the same ``name``), or
        now -- with anything pending -- if ticks are not coming."""
        self._pending[name] = job
        if not self._ticking():
            self.run()

    def tick_done(self) -> None:
        """A tick's command is out: run what is pending."""
        self._last_tick = self._clock()
        self.run()

    def run_if_idle(self) -> None:
        """For a frequent timer: run what is pending if ticks stopped."""
        if self._pending and not self._ticking():
            self.run()

    def run(self) -> None:
        while self._pending:
            name = next(iter(self._pending))
            self._pending.pop(name)()
