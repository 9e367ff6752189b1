"""The privileged teacher: the true model's feed-forward as a residual action.

In simulation the task is known, so the feed-forward that a feed-forward-only actor
(``agent.actor_view: reference``) should add to the env's own controller is known too: what
the physical ceiling (:class:`~metarl_ros.sim.true_dynamics.ComputedTorqueController`, the
true faulted model) commands with the arm exactly on its reference, minus what the env
commands there by itself (its nominal model feed-forward; the PD is zero on the reference).
Training uses it as a label (``TrainConfig.teacher_weight``), as RMA and other
teacher-student methods use privileged simulator state; nothing deployed ever sees it.

With the robot on its reference there is no feedback to correct for a weak motor's weaker PD,
and the ceiling's actuator-delay prediction is left out: the label is the pure feed-forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from metarl_ros.control.law import effort_command
from metarl_ros.control.rigid_body import RigidBodyModel
from metarl_ros.sim.true_dynamics import ComputedTorqueController, FeedbackGains, motor_command

if TYPE_CHECKING:
    from metarl_ros.sim.env_config import EnvSetup
    from metarl_ros.sim.tasks import TaskParams


class FeedForwardTeacher:
    """Labels ``(n,)`` float32 in the env's action space for a task and a reference instant.

    ``label = clip((u_true - u_env) / action_scale, -1, 1)`` with ``u_true`` the ceiling's effort
    command at ``q = q_ref, qd = qd_ref`` and ``u_env`` the env's own effort there; 0 on locked
    joints (their command does nothing). The intact arm's label is 0 up to the model's
    numerical precision when the env feeds the nominal model forward.

    Args:
        setup: the env setup (robot, control law).
        model: the intact arm's rigid-body model (default: built from ``setup``).
    """

    def __init__(self, setup: EnvSetup, model: RigidBodyModel | None = None) -> None:
        self.setup = setup
        model = model or RigidBodyModel.from_robot(setup.robot, setup.robot_path)
        feedback = setup.law.feedback
        self.ceiling = ComputedTorqueController(
            model, setup.robot.effort_limits, FeedbackGains.torque(feedback.kp, feedback.kd),
            firmware_gravity=setup.config.gravity_compensation,
        )
        self.action_scale = np.asarray(setup.robot.action_scale, dtype=np.float64)
        self._zero = np.zeros(setup.act_dim)

    def __call__(
        self, task: TaskParams, reference: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> np.ndarray:
        """The label for ``task`` at ``reference = (q_ref, qd_ref, qdd_ref)`` (rad, rad/s,
        rad/s^2; each (n,))."""
        q_ref, qd_ref, qdd_ref = (np.asarray(v, dtype=np.float64) for v in reference)
        ceiling = self.ceiling
        ceiling.set_task(task)
        tau_motor = ceiling.motor_torque(q_ref, qd_ref, q_ref, qd_ref, qdd_ref)
        gravity = ceiling.nominal.gravity(q_ref) if ceiling.firmware_gravity else None
        wanted = motor_command(tau_motor, ceiling.strength, ceiling.effort_limits, gravity)
        own = effort_command(self.setup.law, self._zero, q_ref, qd_ref, (q_ref, qd_ref, qdd_ref))
        label = np.clip((wanted - own) / self.action_scale, -1.0, 1.0)
        label[list(ceiling.locked_joints)] = 0.0
        return label.astype(np.float32)
