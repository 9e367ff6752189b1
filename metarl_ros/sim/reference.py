"""Joint-space reference trajectories the arm must track.

Each joint follows a sum of sinusoids around a centre pose::

    q_ref_j(t) = c_j + sum_k A_jk * sin(2*pi*f_k*t + phi_jk)

with analytic velocity and acceleration. Frequencies, amplitudes, phases and the centre offset
are drawn per episode from a seeded generator, so a trajectory is reproducible from its seed.
The reference starts at rest-compatible values (it is continuous; the arm is reset onto it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from metarl_ros.core.schema import StrictModel


class ReferenceConfig(StrictModel):
    """Shape of the random multi-sine references."""

    amplitude: list[PositiveFloat] = Field(description="rad, per-joint total amplitude bound")
    frequency_low_hz: PositiveFloat = 0.1
    frequency_high_hz: PositiveFloat = 0.5
    num_components: PositiveInt = 2
    centre_jitter: list[float] = Field(
        description="rad, per-joint half-width of the random offset of the centre pose"
    )


@dataclass(frozen=True)
class MultiSineReference:
    """A sampled multi-sine trajectory.

    Shapes: ``centre`` (n,), ``amplitude`` (n, K), ``frequency`` (K,), ``phase`` (n, K).
    """

    centre: np.ndarray
    amplitude: np.ndarray
    frequency: np.ndarray
    phase: np.ndarray

    @classmethod
    def sample(
        cls,
        config: ReferenceConfig,
        default_pose: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        rng: np.random.Generator,
    ) -> "MultiSineReference":
        n = default_pose.shape[0]
        k = config.num_components
        if len(config.amplitude) != n or len(config.centre_jitter) != n:
            raise ValueError(f"reference amplitude/centre_jitter need {n} entries (one per joint)")
        frequency = rng.uniform(config.frequency_low_hz, config.frequency_high_hz, size=k)
        weights = rng.dirichlet(np.ones(k), size=n)  # (n, K), rows sum to 1
        amplitude = weights * np.asarray(config.amplitude)[:, None]
        phase = rng.uniform(-np.pi, np.pi, size=(n, k))
        jitter = np.asarray(config.centre_jitter)
        centre = default_pose + rng.uniform(-jitter, jitter)
        # keep the whole trajectory inside the joint limits with a margin
        margin = 0.05
        reach = amplitude.sum(axis=1)
        centre = np.clip(centre, lower + reach + margin, upper - reach - margin)
        return cls(centre=centre, amplitude=amplitude, frequency=frequency, phase=phase)

    def __post_init__(self) -> None:
        omega = 2.0 * np.pi * self.frequency  # (K,)
        # coefficients of (sin, cos, sin) for (q, qd, qdd): shape (3, n, K)
        coefficients = np.stack(
            [self.amplitude, self.amplitude * omega, -self.amplitude * omega**2]
        )
        object.__setattr__(self, "_omega", omega)
        object.__setattr__(self, "_coefficients", coefficients)

    def evaluate(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(q_ref, qd_ref, qdd_ref)`` at time ``t``, each shape (n,)."""
        angle = self._omega * t + self.phase  # (n, K)
        sin = np.sin(angle)
        trig = np.stack([sin, np.cos(angle), sin])  # (3, n, K)
        q, qd, qdd = (self._coefficients * trig).sum(axis=2)
        return q + self.centre, qd, qdd
