"""The nominal model's torques along the reference, as observation features in action units.

A fault changes what the arm needs along its reference in a way that is linear in a few
physical parameters (the structure :mod:`metarl_ros.sim.true_dynamics` inverts exactly): with
motor strength ``s`` (per joint), payload dynamic parameters ``pi`` (10, the flange frame's,
convention of :mod:`metarl_ros.control.rigid_body`), viscous damping ``d`` and Coulomb
friction ``c`` (per joint), the motor command that keeps the arm on its reference is::

    u = (tau_nom + Y pi + d * qd_ref + c * tanh(qd_ref / v_c)) / s
    tau_nom = M(q_ref) qdd_ref + C(q_ref, qd_ref) qd_ref + g(q_ref)     (the intact arm, N*m)
    Y       = the flange's torque regressor at the reference, (n, 10)

and the residual on a controller that already feeds ``tau_nom`` forward is ``u - tau_nom``.
:class:`ModelFeatures` computes every factor that does not depend on the fault, once per
control step, so that a policy only has to infer the parameters
(:class:`metarl_ros.learning.model_actor.ModelFeedForwardActor`); the rigid-body model is
Pinocchio's, not learned.

Layout: :data:`NUM_BLOCKS` blocks of ``n`` (joint order), each divided by the joint's
``action_scale`` (so a parameter times a feature is a normalized action)::

    [ tau_nom,  Y[:, 0], ..., Y[:, 9],  qd_ref,  tanh(qd_ref / v_c) ]

With (K, n) inputs it returns (NUM_BLOCKS * K, n), the blocks stacked along the first axis
as :func:`metarl_ros.control.law.build_observation` stacks its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from metarl_ros.control.rigid_body import RigidBodyModel

NUM_PAYLOAD_PARAMETERS = 10
NUM_BLOCKS = 1 + NUM_PAYLOAD_PARAMETERS + 2
"""Feature blocks of ``n`` entries each (layout: module doc)."""
FRICTION_VELOCITY = 0.01
"""rad/s, ``v_c`` of the smooth Coulomb term (the ceiling compensates friction with it too)."""
FEATURE_NAMES = (
    "tau_nom(ref) / action_scale",
    *(f"Y[:, {k}](ref) / action_scale" for k in range(NUM_PAYLOAD_PARAMETERS)),
    "qd_ref / action_scale",
    "tanh(qd_ref / v_c) / action_scale",
)


def num_fault_parameters(num_joints: int) -> int:
    """Length of a fault's parameter vector ``[1/s - 1 (n), pi (10), d (n), c (n)]``
    (:func:`metarl_ros.sim.true_dynamics.fault_parameters`): ``3n + 10``."""
    return 3 * num_joints + NUM_PAYLOAD_PARAMETERS


def parameter_scale(num_joints: int) -> np.ndarray:
    """Typical magnitude of each fault parameter (layout of :func:`num_fault_parameters`),
    shape (3n + 10,): ``1/s - 1`` 1, payload mass 1 kg, first moments 0.1 kg*m, inertias
    0.01 kg*m^2, damping 0.5 N*m*s/rad, Coulomb 1 N*m. Learning and adaptation work on the
    parameters divided by it (O(1) numbers)."""
    n = num_joints
    payload = [1.0, 0.1, 0.1, 0.1] + [0.01] * 6
    return np.array([1.0] * n + payload + [0.5] * n + [1.0] * n)


class ModelFeatures:
    """The fault-independent factors of the feed-forward a fault needs (module doc).

    Args:
        model: the intact arm (:meth:`RigidBodyModel.from_robot`).
        action_scale: N*m per unit of action, shape (n,).
    """

    def __init__(self, model: RigidBodyModel, action_scale) -> None:
        self.model = model
        self.inverse_scale = 1.0 / np.asarray(action_scale, dtype=np.float64)
        if self.inverse_scale.shape != (model.num_joints,):
            raise ValueError(f"action_scale needs {model.num_joints} entries, got "
                             f"{self.inverse_scale.shape}")

    def __call__(self, q_ref: np.ndarray, qd_ref: np.ndarray, qdd_ref: np.ndarray) -> np.ndarray:
        """Features (NUM_BLOCKS * n,) float32 for one instant (each input (n,)), or
        (NUM_BLOCKS * K, n) for K instants (inputs (K, n))."""
        q_ref, qd_ref, qdd_ref = (np.asarray(v, dtype=np.float64) for v in (q_ref, qd_ref,
                                                                           qdd_ref))
        if q_ref.ndim == 2:
            rows = [self._blocks(*row) for row in zip(q_ref, qd_ref, qdd_ref)]
            if not rows:
                return np.zeros((0, self.model.num_joints), np.float32)
            return np.stack(rows, axis=1).reshape(-1, self.model.num_joints).astype(np.float32)
        return self._blocks(q_ref, qd_ref, qdd_ref).reshape(-1).astype(np.float32)

    def _blocks(self, q_ref, qd_ref, qdd_ref) -> np.ndarray:
        """(NUM_BLOCKS, n) float64 for one instant."""
        model = self.model
        tau = model.inverse_dynamics(q_ref, qd_ref, qdd_ref)
        regressor = model.payload_regressor(q_ref, qd_ref, None, qdd_ref)  # (n, 10)
        blocks = np.vstack([
            tau, regressor.T, qd_ref, np.tanh(qd_ref / FRICTION_VELOCITY)
        ])
        return blocks * self.inverse_scale
