"""Throttled logging: at most one line per key and period, counting what it swallowed."""

from __future__ import annotations

import threading
import time
from typing import Callable


class LogThrottle:
    """Allow one message per ``key`` every ``period_s`` (wall clock by default).

    :meth:`ready` returns ``None`` when the message should be dropped, else the number of
    messages for that key that were dropped since the last one let through.
    """

    def __init__(self, period_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = float(period_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def ready(self, key: str) -> int | None:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._dropped.pop(key, 0)
