"""A control tick's efforts as a joint impedance command: setpoints plus a feed-forward torque.

Torque-controlled arms close their joint feedback in a fast loop on the robot (~1 kHz) and take
setpoints from the slower learned loop (50-100 Hz). The control law
(:func:`metarl_ros.control.law.effort_command`) is exactly such a split: a PD on the reference
with the env's gains ``Kp, Kd``, plus everything else (the nominal model's feed-forward, the
policy's action, any parameter adaptation). :func:`impedance_command` writes a tick's clamped
efforts ``tau`` as::

    position = q_ref,  velocity = qd_ref,  acceleration = qdd_ref
    feed_forward = tau - (Kp (q_ref - q) + Kd (qd_ref - qd))        (q, qd: the tick's reading)

so that a fast loop ``Kp (position - q(t)) + Kd (velocity - qd(t)) + feed_forward`` with the
env's gains commands exactly ``tau`` at the tick's instant and then keeps correcting the
feedback between ticks, its setpoint moving on along the reference's local parabola (``position
+ velocity t + acceleration t^2 / 2``) until the next tick. A safe tick becomes a compliant
hold where the arm is (``position = q``, ``velocity = 0``, no feed-forward): a fast loop with
fixed gains cannot go limp, so both safe modes hold (the robot's own gravity compensation stays
on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarl_ros.control.law import ControlLaw


@dataclass(frozen=True)
class ImpedanceCommand:
    """Setpoints and feed-forward for a joint impedance loop, each (n,) in contract order."""

    position: np.ndarray
    """rad"""
    velocity: np.ndarray
    """rad/s"""
    acceleration: np.ndarray
    """rad/s^2"""
    feed_forward: np.ndarray
    """N*m, added to the loop's ``Kp``/``Kd`` feedback (and to the robot's gravity
    compensation)."""


def along_parabola(position: np.ndarray, velocity: np.ndarray, acceleration: np.ndarray,
                   s: float) -> tuple[np.ndarray, np.ndarray]:
    """The setpoint (position, velocity) ``s`` seconds on (``s < 0``: back) along the parabola
    through ``position`` with ``velocity`` and constant ``acceleration`` (each (n,))."""
    return position + (velocity + 0.5 * acceleration * s) * s, velocity + acceleration * s


def impedance_command(law: ControlLaw, efforts: np.ndarray, position: np.ndarray,
                      velocity: np.ndarray, reference: tuple[np.ndarray, ...] | None,
                      safe: bool) -> ImpedanceCommand:
    """The impedance form of a tick's ``efforts`` (N*m, (n,)) for the reading ``position``,
    ``velocity`` and the ``reference`` ``(q_ref, qd_ref, qdd_ref)`` it was computed on (module
    doc); ``safe`` (or no reference yet): a compliant hold at ``position``."""
    position = np.asarray(position, dtype=np.float64)
    if safe or reference is None:
        zeros = np.zeros_like(position)
        return ImpedanceCommand(position.copy(), zeros, zeros.copy(), zeros.copy())
    q_ref, qd_ref, qdd_ref = (np.asarray(v, dtype=np.float64) for v in reference[:3])
    feedback = law.feedback
    pd = (np.asarray(feedback.kp) * (q_ref - position)
          + np.asarray(feedback.kd) * (qd_ref - np.asarray(velocity, dtype=np.float64)))
    return ImpedanceCommand(q_ref.copy(), qd_ref.copy(), qdd_ref.copy(),
                            np.asarray(efforts, dtype=np.float64) - pd)
