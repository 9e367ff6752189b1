"""What one demo run leaves behind: tracking error and latent over simulated time.

:class:`TraceRecorder` builds a :class:`Trace` from what a ROS observer receives (joint states
and references paired by stamp, joints matched by name); the ROS-free runs fill a
:class:`Trace` directly. Both feed the same metric (:mod:`metarl_ros.demo.report`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Trace:
    """One run.

    Attributes:
        time_s: (T,) simulated time of each tracking-error sample, increasing.
        tracking_error: (T,) ``||q_ref - q||_2`` in rad at that instant.
        latent_time_s: (L,) simulated time of each latent sample (L = 0 without latent).
        latent_norm: (L,) ``||mean of the posterior over the task latent||``.
        events: ``(time_s, label)`` of the task changes the simulator reported.
    """

    time_s: np.ndarray
    tracking_error: np.ndarray
    latent_time_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    latent_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    events: tuple[tuple[float, str], ...] = ()

    def mean_between(self, start_s: float, end_s: float) -> float | None:
        """Mean tracking error over samples with ``start_s <= t < end_s``; None if none."""
        mask = (self.time_s >= start_s - 1e-9) & (self.time_s < end_s - 1e-9)
        if not mask.any():
            return None
        return float(self.tracking_error[mask].mean())


class TraceRecorder:
    """Pairs ``/joint_states`` with ``/reference`` by stamp; thread-safe (executor callbacks).

    Joints are matched by name: the reference's names give the order (the state may list its
    joints in any order, with extra ones). Stamps seen more than once (the simulator repeats
    t = 0 until the controller answers) keep the last message.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}
        self._references: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}
        self._latent: list[tuple[float, float]] = []
        self._events: list[tuple[float, str]] = []
        self._last_stamp_ns = 0

    def add_state(self, stamp_ns: int, names: Sequence[str], position: Sequence[float]) -> None:
        with self._lock:
            self._states[stamp_ns] = (tuple(names), np.asarray(position, dtype=np.float64))
            self._last_stamp_ns = max(self._last_stamp_ns, stamp_ns)

    def add_reference(self, stamp_ns: int, names: Sequence[str],
                      position: Sequence[float]) -> None:
        with self._lock:
            self._references[stamp_ns] = (tuple(names), np.asarray(position, dtype=np.float64))

    def add_latent(self, mean: Sequence[float]) -> None:
        """A posterior mean, timed by the newest joint state received (latents carry no stamp;
        off by at most a control period)."""
        with self._lock:
            self._latent.append((self._last_stamp_ns * 1e-9, float(np.linalg.norm(mean))))

    def add_event(self, time_s: float, label: str) -> None:
        with self._lock:
            self._events.append((float(time_s), label))

    def trace(self) -> Trace:
        """The tracking error at every stamp seen on both topics."""
        with self._lock:
            stamps = sorted(set(self._states) & set(self._references))
            errors = [self._error(self._references[k], self._states[k]) for k in stamps]
            latent = sorted(self._latent)
            events = tuple(sorted(self._events))
        return Trace(
            time_s=np.array(stamps, dtype=np.float64) * 1e-9,
            tracking_error=np.array(errors, dtype=np.float64),
            latent_time_s=np.array([t for t, _ in latent], dtype=np.float64),
            latent_norm=np.array([n for _, n in latent], dtype=np.float64),
            events=events,
        )

    @staticmethod
    def _error(reference: tuple[tuple[str, ...], np.ndarray],
               state: tuple[tuple[str, ...], np.ndarray]) -> float:
        ref_names, q_ref = reference
        state_names, q = state
        if ref_names and ref_names != state_names:
            index = {name: i for i, name in enumerate(state_names)}
            missing = [name for name in ref_names if name not in index]
            if missing:
                raise ValueError(f"joint state lacks reference joints {missing}")
            q = q[[index[name] for name in ref_names]]
        return float(np.linalg.norm(q_ref - q))
