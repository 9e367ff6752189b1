"""Computed torque with the true faulted model: the physical ceiling's numpy core.

It lives beside the simulator because it inverts the dynamics exactly as the simulator
applies a task; :mod:`metarl_ros.policy.computed_torque` runs it as a policy, and
:mod:`metarl_ros.sim.teacher` turns it into training labels.

:class:`ComputedTorqueController` is told the task (:class:`~metarl_ros.sim.tasks.TaskParams`,
privileged like the project's oracle) and inverts the *true* dynamics (payload included)::

    a     = qdd_ref + Kp e + Kd ed                      e = q_ref - q, ed = qd_ref - qd
    tau_m = M(q) a + C(q, qd) qd + g(q) + d qd + c tanh(qd_ref / v_c)      (motor torque)

with the gains in acceleration space (default ``Kp = 400 s^-2, Kd = 40 s^-1``: a critically
damped 20 rad/s loop, which keeps an estimated ~40 deg of phase margin at 100 Hz with 8 ms
actuator delay), or in torque space (``FeedbackGains.torque``: ``tau_m = M qdd_ref + C qd + g +
Kp e + Kd ed``, the closed loop's stiffness is then exactly ``Kp`` N*m/rad, e.g. the env PD's,
for comparisons at equal compliance).

The task enters as the simulator applies it (:mod:`metarl_ros.sim.arm_sim`): motor strength
``s`` (``tau_m`` is saturated at ``s * limit`` and divided by ``s``), Coulomb friction ``c`` and
viscous damping ``d`` (compensated as known), locked joints (a braked joint does not move: the
others are computed with its velocity and acceleration zero; its command is irrelevant), and
actuator delay (state and reference are predicted forward by the delay with the last commanded
acceleration, so that the command fits the moment it reaches the motors; measured effect on the
ceiling is within +-0.05 mrad for delays <= 8 ms, i.e. the delay is not what limits it). The
Coulomb term uses the reference velocity's sign: the measured velocity's was 4-10x worse
against PyBullet's stick-slip friction motor. Sensor noise is not modelled. The output is the
*effort command* the env/robot takes: the firmware adds the nominal arm's gravity ``g_nom(q)``
itself (``firmware_gravity``), so ``tau_m / s - g_nom``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from metarl_ros.control.model_features import (
    FRICTION_VELOCITY,
    NUM_PAYLOAD_PARAMETERS,
    num_fault_parameters,
)
from metarl_ros.control.rigid_body import RigidBodyModel, point_mass_parameters

if TYPE_CHECKING:
    from metarl_ros.sim.tasks import TaskParams

PAYLOAD_RADIUS_M = 0.03
"""The simulator gives its payload the inertia of a solid sphere of this radius."""


@dataclass(frozen=True)
class FeedbackGains:
    """Joint-space feedback on ``e = q_ref - q``, ``ed = qd_ref - qd``; each gain shape (n,).

    ``space="acceleration"``: ``M(q) (Kp e + Kd ed)`` (``Kp`` s^-2, ``Kd`` s^-1; stiffness
    ``M(q) Kp`` varies with the pose). ``space="torque"``: ``Kp e + Kd ed`` (N*m/rad,
    N*m*s/rad; stiffness ``Kp``, the compliance of a PD with the same gains).
    """

    kp: np.ndarray
    kd: np.ndarray
    space: Literal["acceleration", "torque"] = "acceleration"

    @classmethod
    def critically_damped(cls, omega: float, num_joints: int) -> "FeedbackGains":
        """Acceleration-space gains of a critically damped loop of ``omega`` rad/s."""
        return cls(np.full(num_joints, omega**2), np.full(num_joints, 2.0 * omega))

    @classmethod
    def torque(cls, kp, kd) -> "FeedbackGains":
        """Torque-space gains (N*m/rad, N*m*s/rad): a given compliance."""
        return cls(np.asarray(kp, float), np.asarray(kd, float), "torque")

    def torque_of(self, mass: np.ndarray | None, e: np.ndarray, ed: np.ndarray) -> np.ndarray:
        """The feedback torque (N*m, shape (n,)); ``mass`` (n, n) is needed in acceleration
        space only."""
        raw = self.kp * e + self.kd * ed
        if self.space == "torque":
            return raw
        if mass is None:
            raise ValueError("acceleration-space gains need the mass matrix")
        return mass @ raw


DEFAULT_OMEGA = 20.0
"""rad/s, bandwidth of the ceiling's default acceleration-space gains."""


def motor_command(
    tau_motor: np.ndarray,
    strength: np.ndarray,
    effort_limits: np.ndarray,
    gravity_nominal: np.ndarray | None,
) -> np.ndarray:
    """The effort command (N*m, shape (n,)) that makes the motors deliver ``tau_motor``.

    The simulated motors deliver ``s * clip(command + g_nom, +-limit)``; ``gravity_nominal``
    is ``g_nom`` when the firmware adds it (``None`` otherwise). Dead motors (s ~ 0) get 0.
    """
    alive = strength > 1e-6
    wanted = np.where(alive, tau_motor / np.where(alive, strength, 1.0), 0.0)
    total = np.clip(wanted, -effort_limits, effort_limits)
    return total if gravity_nominal is None else total - gravity_nominal


class ComputedTorqueController:
    """The ceiling's numpy core (control law: module doc).

    Args:
        model: the intact arm (:meth:`RigidBodyModel.from_robot`).
        effort_limits: N*m, shape (n,).
        gains: feedback gains (default: critically damped at :data:`DEFAULT_OMEGA`).
        task: the true task (default: intact); change it with :meth:`set_task`.
        firmware_gravity: the robot adds ``g_nom(q)`` to every command (env default: yes).
        physics_dt: s, the simulator's step; the delay is rounded to it as the simulator does.
        friction_velocity: rad/s, ``v_c`` of the smooth Coulomb compensation.
    """

    def __init__(
        self,
        model: RigidBodyModel,
        effort_limits,
        gains: FeedbackGains | None = None,
        task: "TaskParams | None" = None,
        firmware_gravity: bool = True,
        physics_dt: float | None = None,
        friction_velocity: float = FRICTION_VELOCITY,
    ) -> None:
        n = model.num_joints
        self.nominal = model
        self.effort_limits = np.asarray(effort_limits, dtype=np.float64)
        self.gains = gains or FeedbackGains.critically_damped(DEFAULT_OMEGA, n)
        self.firmware_gravity = firmware_gravity
        self.physics_dt = physics_dt
        self.friction_velocity = friction_velocity
        self._task: "TaskParams | None" = None
        self.set_task(task)
        self.reset()

    def set_task(self, task: "TaskParams | None") -> None:
        """Switch to the physical parameters in force now (``None``: the intact arm)."""
        n = self.nominal.num_joints
        if task is not None and task == self._task:
            return
        self._task = task
        mass = task.payload_mass if task is not None else 0.0
        self.model = (
            self.nominal.with_payload(mass, task.payload_offset, PAYLOAD_RADIUS_M)
            if task is not None and mass > 0 else self.nominal
        )
        self.strength = _per_joint(task.motor_strength if task else (), n, 1.0)
        self.coulomb = _per_joint(task.coulomb_friction if task else (), n, 0.0)
        self.damping = _per_joint(task.viscous_damping if task else (), n, 0.0)
        self.locked_joints = tuple(sorted(task.locked_joints)) if task else ()
        self.free = np.ones(n, dtype=bool)
        self.free[list(self.locked_joints)] = False
        delay = task.actuator_delay_s if task else 0.0
        if self.physics_dt:
            delay = round(delay / self.physics_dt) * self.physics_dt
        self.delay_s = delay

    def reset(self) -> None:
        """Forget the last commanded acceleration (start of an episode)."""
        self._last_acceleration = np.zeros(self.nominal.num_joints)

    def motor_torque(self, q, qd, q_ref, qd_ref, qdd_ref) -> np.ndarray:
        """Desired motor torque ``tau_m`` (N*m, shape (n,)) before saturation; no delay."""
        free = self.free
        qd = np.where(free, qd, 0.0)
        e, ed = np.where(free, q_ref - q, 0.0), np.where(free, qd_ref - qd, 0.0)
        mass = self.model.mass_matrix(q)
        if self.gains.space == "acceleration":
            accel = np.where(free, qdd_ref + self.gains.kp * e + self.gains.kd * ed, 0.0)
            tau = self.model.inverse_dynamics(q, qd, accel)
        else:
            feedback = np.where(free, self.gains.torque_of(mass, e, ed), 0.0)
            accel = np.where(free, qdd_ref, 0.0)
            tau = self.model.inverse_dynamics(q, qd, accel) + feedback
            accel[free] += np.linalg.solve(mass[np.ix_(free, free)], feedback[free])
        self._last_acceleration = accel
        friction = self.damping * qd + self.coulomb * np.tanh(qd_ref / self.friction_velocity)
        return np.where(free, tau + friction, 0.0)

    def torque(self, q, qd, q_ref, qd_ref, qdd_ref, dt: float) -> np.ndarray:
        """Effort command (N*m, shape (n,)) for the measured state and the reference (rad,
        rad/s, rad/s^2; each shape (n,)). ``dt`` (s, the control period) is unused."""
        q, qd = np.asarray(q, float), np.asarray(qd, float)
        gravity_nominal = self.nominal.gravity(q) if self.firmware_gravity else None
        if self.delay_s > 0.0:
            h, a = self.delay_s, self._last_acceleration
            q, qd = q + qd * h + 0.5 * a * h * h, qd + a * h
            q_ref = q_ref + qd_ref * h + 0.5 * qdd_ref * h * h
            qd_ref = qd_ref + qdd_ref * h
        tau_motor = self.motor_torque(q, qd, q_ref, qd_ref, qdd_ref)
        return motor_command(tau_motor, self.strength, self.effort_limits, gravity_nominal)


def fault_parameters(task: "TaskParams | None", num_joints: int) -> np.ndarray:
    """The physical parameters of ``task`` in the layout a model-structured actor infers
    (:class:`metarl_ros.learning.model_actor.ModelFeedForwardActor`), shape (3n + 10,)::

        [1/s - 1 (n), payload pi (10, flange frame, about its origin), d (n), c (n)]

    (strength ``s``, viscous damping ``d`` N*m*s/rad, Coulomb friction ``c`` N*m; the intact
    arm is all zeros). Locks and actuator delay are outside this structure.
    """
    n = num_joints
    if task is None:
        return np.zeros(num_fault_parameters(n))
    strength = _per_joint(task.motor_strength, n, 1.0)
    payload = (point_mass_parameters(task.payload_mass, task.payload_offset, PAYLOAD_RADIUS_M)
               if task.payload_mass > 0 else np.zeros(NUM_PAYLOAD_PARAMETERS))
    return np.concatenate([
        1.0 / np.maximum(strength, 1e-6) - 1.0, payload,
        _per_joint(task.viscous_damping, n, 0.0), _per_joint(task.coulomb_friction, n, 0.0),
    ])


def _per_joint(values, n: int, default: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) if len(values) else np.full(n, default)
