"""A tick's observation on the measured joint state, built only when something needs it whole.

With ``act_ahead`` the action is computed before the joint state arrives, and what remains on
the sensor-to-command path is a correction on the measured state (the MAML correction). It
reads only the observation's tracking-error blocks, so :class:`MeasuredObservation` gives
those alone (:func:`tracking_errors`, the same float32 values
:func:`~metarl_ros.control.law.build_observation` writes) and builds the whole observation
once the command is out, for the transition and the adaptation's query.
"""

from __future__ import annotations

from array import array

import numpy as np

from metarl_ros.control.law import ControlLaw, ReferenceTerms, build_observation
from metarl_ros.control.prepared import Reference


def tracking_errors(law: ControlLaw, position: np.ndarray, velocity: np.ndarray,
                    reference: Reference) -> list[float]:
    """The observation's ``(q_ref - q) * position_error_scale`` and ``(qd_ref - qd) *
    velocity_error_scale`` blocks, 2 n floats, each exactly the float32 value
    :func:`~metarl_ros.control.law.build_observation` gives (computed in float64, rounded
    to float32 once), without building the rest. Inputs (n,)."""
    scales = law.observation
    position_scale, velocity_scale = scales.position_error_scale, scales.velocity_error_scale
    values = [(r - q) * position_scale for r, q in zip(reference[0].tolist(), position.tolist())]
    values += [(r - qd) * velocity_scale
               for r, qd in zip(reference[1].tolist(), velocity.tolist())]
    return array("f", values).tolist()  # float64 -> float32 as numpy's astype rounds


def observation_errors(observation: np.ndarray, num_joints: int) -> list[float]:
    """The same two blocks, 2 n floats, read from an observation (obs_dim,) already built."""
    n = num_joints
    return np.asarray(observation)[2 * n: 4 * n].tolist()


class MeasuredObservation:
    """The observation of one tick's measured joint state (``position``, ``velocity`` (n,)),
    its ``reference`` and the previous action (n,) float32: :meth:`tracking_errors` at once,
    :meth:`observation` (obs_dim,) float32 built on first use and kept. :meth:`given` wraps
    an observation that already exists."""

    __slots__ = ("_law", "_position", "_velocity", "_reference", "_previous_action", "_terms",
                 "_observation", "_errors")

    def __init__(self, law: ControlLaw, position: np.ndarray, velocity: np.ndarray,
                 reference: Reference, previous_action: np.ndarray,
                 terms: ReferenceTerms | None = None) -> None:
        self._law = law
        self._position, self._velocity = position, velocity
        self._reference = reference
        self._previous_action = previous_action
        self._terms = terms
        self._observation: np.ndarray | None = None
        self._errors: list[float] | None = None

    @classmethod
    def given(cls, observation: np.ndarray, num_joints: int) -> MeasuredObservation:
        """An observation (obs_dim,) already built, of ``num_joints`` joints."""
        measured = cls.__new__(cls)
        measured._observation = np.asarray(observation, np.float32)
        measured._errors = observation_errors(measured._observation, num_joints)
        return measured

    def tracking_errors(self) -> list[float]:
        """The position-error and velocity-error blocks, 2 n floats (:func:`tracking_errors`)."""
        if self._errors is None:
            self._errors = tracking_errors(self._law, self._position, self._velocity,
                                           self._reference)
        return self._errors

    def observation(self) -> np.ndarray:
        """The whole observation (obs_dim,) float32, as
        :func:`~metarl_ros.control.law.build_observation` builds it."""
        if self._observation is None:
            self._observation = build_observation(self._law, self._position, self._velocity,
                                                  self._reference, self._previous_action,
                                                  self._terms)
        return self._observation
