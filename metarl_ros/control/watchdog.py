"""Age of the latest accepted input, and when it counts as stale."""

from __future__ import annotations

import math


class Watchdog:
    """Tracks the age of the latest accepted input. Stale when older than ``timeout_s``.

    An input that never arrived has no age (``inf``) until the watchdog is :meth:`arm`-ed;
    from then on it counts from the arming time, so "never arrived" becomes stale only after
    the timeout, like "stopped arriving".
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.last_s: float | None = None
        self.armed_s: float | None = None

    def feed(self, now_s: float) -> None:
        self.last_s = float(now_s)

    def arm(self, now_s: float) -> None:
        """Start expecting input now (no effect once armed or fed)."""
        if self.armed_s is None and self.last_s is None:
            self.armed_s = float(now_s)

    def age(self, now_s: float) -> float:
        """Seconds since the last input (or since arming, if none arrived); else ``inf``."""
        since = self.last_s if self.last_s is not None else self.armed_s
        if since is None:
            return math.inf
        return max(0.0, float(now_s) - since)

    def stale(self, now_s: float) -> bool:
        return self.age(now_s) > self.timeout_s
