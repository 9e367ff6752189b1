"""The policy's latent over successive context updates: how far it moved, adaptation events."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatentUpdate:
    mean: np.ndarray
    std: np.ndarray
    window_fill: int
    shift: float
    """||mean - previous mean||_2 (latent units) since the previous context update."""
    adaptation_event: bool
    """``moved`` exceeded the threshold (the reference then moves to the current mean)."""
    moved: float = 0.0
    """what is compared with ``adaptation_event_threshold``: the RMS over latent dimensions of
    (mean - reference mean) / posterior std, the reference being the mean at the previous
    adaptation event (or the first update)."""


class LatentTracker:
    """Turns successive posteriors (mean, std) into :class:`LatentUpdate` s."""

    def __init__(self) -> None:
        self._reference: np.ndarray | None = None
        self._previous: np.ndarray | None = None

    def update(self, mean: np.ndarray, std: np.ndarray, window_fill: int,
               threshold: float) -> LatentUpdate:
        """The next posterior; an adaptation event if it moved more than ``threshold``."""
        shift = 0.0 if self._previous is None else float(np.linalg.norm(mean - self._previous))
        self._previous = mean
        event = False
        moved = 0.0
        if self._reference is None:
            self._reference = mean
        else:
            scale = np.maximum(std, 1e-6)
            moved = float(np.linalg.norm((mean - self._reference) / scale))
            moved /= math.sqrt(mean.size)
            if moved > threshold:
                event = True
                self._reference = mean
        return LatentUpdate(mean, std, int(window_fill), shift, event, moved)
