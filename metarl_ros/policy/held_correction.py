"""The control-loop side of the MAML action correction: numpy only, no torch.

MAML adaptation (:class:`~metarl_ros.policy.dynamics_adaptation.DynamicsAdaptation`) runs at
10 Hz -- in the control process (``inline``) or in a process of its own
(:mod:`metarl_ros.policy.adaptation_process`) -- and leaves a :class:`HeldCorrection`: with the
structured torque-gain model, a per-joint gain ratio ``r`` and bias torque ``c``; with the
plain MLP model, an action offset. :class:`CorrectionApplier` adds it to every action of the
control loop, which costs microseconds and touches no torch tensor (so it never waits for the
GIL behind adaptation work).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from metarl_ros.control.measured import observation_errors

LAG_HORIZON_TICKS = 25
"""Time constant, in control ticks, of the per-joint mean tracking error the lag gate reads
(0.25 s at 100 Hz: the context window's span)."""


@dataclass(frozen=True)
class HeldCorrection:
    """What one adaptation leaves for the control loop, each array (n,) float32.

    ``ratio``, ``bias``: structured model, the gain ratio and bias torque (``da = (r - 1) u +
    c``; ones and zeros where a joint is not corrected); ``offset``: MLP model, the action
    offset. ``active``: a correction is being applied.
    """

    ratio: np.ndarray
    bias: np.ndarray
    offset: np.ndarray
    active: bool = False

    @cached_property
    def identity(self) -> bool:
        """Corrects nothing: gain ratio 1, bias and offset 0 on every joint (computed once)."""
        return bool((self.ratio == 1.0).all() and not self.bias.any() and not self.offset.any())

    @cached_property
    def terms(self) -> tuple[list[float], list[float]]:
        """``(r - 1, c)`` per joint as Python floats, computed once: what the structured
        formula multiplies the commanded torque by and adds."""
        return [r - 1.0 for r in self.ratio.tolist()], self.bias.tolist()

    @classmethod
    def none(cls, n: int) -> HeldCorrection:
        """No correction (the un-adapted policy)."""
        return cls(np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32))

    def to_arrays(self) -> np.ndarray:
        """(3, n) float32: ratio, bias, offset (for a pipe)."""
        return np.stack([self.ratio, self.bias, self.offset]).astype(np.float32)

    @classmethod
    def from_arrays(cls, arrays: np.ndarray, active: bool) -> HeldCorrection:
        ratio, bias, offset = np.asarray(arrays, np.float32)
        return cls(ratio.copy(), bias.copy(), offset.copy(), bool(active))


@dataclass(frozen=True)
class CorrectionSettings:
    """How a held correction is applied (per model kind; plain values, picklable).

    ``structured``: the torque-gain model (else the MLP's offset). ``kp_u``, ``kd_u`` (n,):
    the PD gains in action units per observation unit (``u = a + kp_u * e_q + kd_u * e_qd``);
    ``position_error_scale``: the observation's scale of ``q_ref - q``; ``max_correction``:
    bound per action dimension; ``lag_band_rad``: the lag gate's band (None: no gate).
    """

    structured: bool
    act_dim: int
    kp_u: np.ndarray
    kd_u: np.ndarray
    position_error_scale: float
    max_correction: float
    lag_band_rad: float | None


class CorrectionApplier:
    """Applies the latest :class:`HeldCorrection` to each action (the control loop's part).

    The held correction is one immutable object, replaced whole (:meth:`hold`), so a reader
    on another thread never sees half an update. The lag gate's per-joint mean tracking error
    is updated at every :meth:`apply` (see
    :class:`~metarl_ros.policy.dynamics_adaptation.DynamicsAdaptation` for what the gate does).

    The structured formula runs joint by joint on Python floats (float64): on 7 joints a numpy
    expression is mostly per-call overhead (as about 25 ufunc calls it took 12 µs, one pass
    over the joints 4.5 µs), and it runs on every control tick's sensor-to-command path
    (docs/BENCHMARKS.md, "Cost of the MAML correction online").
    """

    def __init__(self, settings: CorrectionSettings) -> None:
        self.settings = settings
        self._kp_u = np.asarray(settings.kp_u, np.float64).tolist()
        self._kd_u = np.asarray(settings.kd_u, np.float64).tolist()
        self.held = HeldCorrection.none(settings.act_dim)
        self._lag = [0.0] * settings.act_dim  # rad, per joint (lag gate)

    @property
    def mean_lag(self) -> np.ndarray:
        """The lag gate's per-joint mean tracking error ``q_ref - q``, (n,) float64, rad."""
        return np.array(self._lag)

    def hold(self, held: HeldCorrection) -> None:
        """Apply ``held`` from the next action on."""
        self.held = held

    def reset(self) -> None:
        """No correction, and the lag gate's mean forgotten."""
        n = self.settings.act_dim
        self.held = HeldCorrection.none(n)
        self._lag = [0.0] * n

    def apply(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """:meth:`apply_to_errors` with the tracking errors of the measured observation
        ``obs`` (obs_dim,) float32."""
        return self.apply_to_errors(observation_errors(obs, self.settings.act_dim), action)

    def apply_to_errors(self, errors: list[float], action: np.ndarray) -> np.ndarray:
        """The corrected action (act_dim,) float32 in [-1, 1]: the held offset, or (structured
        model) ``(r - 1) u + c`` with the held gain ratio ``r`` and bias torque ``c`` and the
        current commanded torque ``u``, through the lag gate. ``errors`` (2 n floats): the
        measured observation's position-error and velocity-error blocks, in observation units
        (:func:`~metarl_ros.control.measured.tracking_errors`): ``u`` includes the PD
        feedback on them. A non-finite error gives a non-finite action (the loop's check
        refuses it), and a non-finite position error leaves the lag gate's mean as it was."""
        s, held = self.settings, self.held
        if not s.structured:
            return _clip(action + held.offset, 1.0).astype(np.float32)
        n = s.act_dim
        position_errors, velocity_errors = errors[:n], errors[n:]
        total = sum(position_errors)
        if total - total == 0.0:  # all finite (float32 values: the sum cannot overflow)
            scale, lag = s.position_error_scale, self._lag
            self._lag = [m + (e / scale - m) / LAG_HORIZON_TICKS
                         for m, e in zip(lag, position_errors)]
            if held.identity:  # the common case: the formula gives exactly this (offset 0)
                total = sum(velocity_errors)
                if total - total == 0.0:
                    return _clip(action, 1.0).astype(np.float32)
        gains, biases = held.terms
        bound, band = s.max_correction, s.lag_band_rad
        out = []
        for a, e, ed, kp, kd, g, c, m in zip(action.tolist(), position_errors, velocity_errors,
                                           self._kp_u, self._kd_u, gains, biases, self._lag):
            offset = g * (a + kp * e + kd * ed) + c  # NaN stays NaN through the comparisons
            offset = bound if offset > bound else -bound if offset < -bound else offset
            if band is not None:  # the lag gate: the mean lag in the direction the offset
                # pushes, in units of the band, within [0, 1]
                gate = (m if offset > 0.0 else -m if offset < 0.0 else 0.0) / band
                offset *= 1.0 if gate > 1.0 else 0.0 if gate < 0.0 else gate
            value = a + offset
            out.append(1.0 if value > 1.0 else -1.0 if value < -1.0 else value)
        return np.array(out, np.float32)


def _clip(values: np.ndarray, bound: float) -> np.ndarray:
    """``np.clip(values, -bound, bound)`` (NaN stays NaN) without np.clip's Python wrapper,
    which costs as much as the arithmetic on a control tick."""
    return np.minimum(np.maximum(values, -bound), bound)
