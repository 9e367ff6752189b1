"""The physical ceiling and the classical controllers as policies in the env's action space.

The ceiling's control law (:class:`~metarl_ros.sim.true_dynamics.ComputedTorqueController`,
computed torque with the true faulted model) is in :mod:`metarl_ros.sim.true_dynamics`.
This module holds what the three classical controllers share: :class:`ObservationCodec` and
the :class:`TorqueControllerPolicy` adapter (``AdaptivePolicy`` protocol) that runs a torque
controller in the env's residual action space ``a = clip((tau - PD) / action_scale, -1, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from metarl_ros.control.policy_interface import PolicyContract, PosteriorSummary
from metarl_ros.control.rigid_body import RigidBodyModel
from metarl_ros.sim.true_dynamics import ComputedTorqueController, FeedbackGains

if TYPE_CHECKING:
    from metarl_ros.sim.tasks import TaskParams

# -------------------------------------------------------------------- env adapter


@dataclass(frozen=True)
class ObservationCodec:
    """Reads the env observation and writes the residual action (layout:
    :mod:`metarl_ros.control.law`). Per-joint arrays have shape (n,)."""

    default_pose: np.ndarray
    kp: np.ndarray
    """N*m/rad, the env's fixed PD feedback."""
    kd: np.ndarray
    """N*m*s/rad."""
    action_scale: np.ndarray
    """N*m per unit of action."""
    position_error_scale: float
    velocity_error_scale: float
    velocity_scale: float
    acceleration_scale: float
    feed_forward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
    """the law's model feed-forward, which the env adds to every effort too."""

    @classmethod
    def from_law(cls, law) -> "ObservationCodec":
        """From a :class:`~metarl_ros.control.law.ControlLaw` (an env setup's ``law``)."""
        obs = law.observation
        return cls(
            np.asarray(law.default_pose, float),
            np.asarray(law.feedback.kp, float),
            np.asarray(law.feedback.kd, float),
            np.asarray(law.action_scale, float),
            float(obs.position_error_scale),
            float(obs.velocity_error_scale),
            float(obs.velocity_scale),
            float(obs.acceleration_scale),
            law.feed_forward,
        )

    def decode(self, obs: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(q, qd, q_ref, qd_ref, qdd_ref)`` from an observation (7n,)."""
        n = self.default_pose.shape[0]
        block = [np.asarray(obs[i * n : (i + 1) * n], dtype=np.float64) for i in range(6)]
        q = block[0] + self.default_pose
        qd = block[1] / self.velocity_scale
        q_ref = q + block[2] / self.position_error_scale
        qd_ref = block[4] / self.velocity_scale
        return q, qd, q_ref, qd_ref, block[5] / self.acceleration_scale

    def env_effort(self, obs: np.ndarray) -> np.ndarray:
        """The effort the env commands on its own for this observation (N*m, shape (n,)):
        its PD feedback, plus the law's model feed-forward if it has one."""
        n = self.default_pose.shape[0]
        e = np.asarray(obs[2 * n : 3 * n], float) / self.position_error_scale
        ed = np.asarray(obs[3 * n : 4 * n], float) / self.velocity_error_scale
        own = self.kp * e + self.kd * ed
        if self.feed_forward is not None:
            _, _, q_ref, qd_ref, qdd_ref = self.decode(obs)
            own = own + self.feed_forward(q_ref, qd_ref, qdd_ref)
        return own

    def action(self, command: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Normalized action (float32, (n,)) making the env's effort ``command`` (N*m)."""
        residual = (command - self.env_effort(obs)) / self.action_scale
        return np.clip(residual, -1.0, 1.0).astype(np.float32)

    def effort(self, action: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """The effort command (N*m, (n,)) the env applied for ``action`` after ``obs``."""
        applied = np.clip(np.asarray(action, float), -1.0, 1.0)
        return self.env_effort(obs) + applied * self.action_scale


class TorqueController(Protocol):
    """What :class:`TorqueControllerPolicy` drives. Optional: ``record_applied(command)``
    (the effort actually sent, N*m (n,)) and ``estimate() -> np.ndarray`` (its belief)."""

    def reset(self) -> None: ...

    def torque(self, q, qd, q_ref, qd_ref, qdd_ref, dt: float) -> np.ndarray: ...


class TorqueControllerPolicy:
    """A torque controller as an ``AdaptivePolicy`` in the env's residual action space.

    ``act`` decodes the observation, asks the controller for its effort command and returns
    ``clip((command - PD) / action_scale, -1, 1)``. ``observe`` reconstructs the effort the env
    applied (``PD + action * action_scale``) and hands it to the controller. ``posterior``
    reports the controller's ``estimate()`` (e.g. a disturbance or parameter estimate).
    """

    def __init__(
        self, controller: TorqueController, codec: ObservationCodec, contract: PolicyContract
    ) -> None:
        self.controller = controller
        self.codec = codec
        self.contract = contract
        self.dt = 1.0 / contract.control_rate_hz

    @classmethod
    def from_setup(cls, setup, controller: TorqueController) -> "TorqueControllerPolicy":
        """For an env setup (:class:`~metarl_ros.sim.env_config.EnvSetup`)."""
        robot = setup.robot
        estimate = getattr(controller, "estimate", None)
        contract = PolicyContract(
            joint_names=tuple(robot.joint_names),
            control_rate_hz=float(setup.config.control_rate_hz),
            window_size=0,
            latent_dim=0 if estimate is None else int(np.size(estimate())),
            obs_dim=setup.obs_dim,
            act_dim=setup.act_dim,
            action_scale=tuple(float(v) for v in robot.action_scale),
            effort_limits=tuple(float(v) for v in robot.effort_limits),
        )
        return cls(controller, ObservationCodec.from_law(setup.law), contract)

    def reset(self) -> None:
        self.controller.reset()

    def observe(
        self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray
    ) -> None:
        record = getattr(self.controller, "record_applied", None)
        if record is not None:
            record(self.codec.effort(action, obs))

    def act(self, obs: np.ndarray) -> np.ndarray:
        command = self.controller.torque(*self.codec.decode(obs), self.dt)
        return self.codec.action(command, obs)

    def posterior(self) -> PosteriorSummary:
        estimate = getattr(self.controller, "estimate", None)
        mean = np.zeros(0) if estimate is None else np.asarray(estimate(), dtype=np.float64)
        return PosteriorSummary(mean, np.zeros_like(mean), 0)


class ComputedTorquePolicy(TorqueControllerPolicy):
    """The ceiling as a policy. It must be told the true task: :meth:`set_task`, or a
    ``task_source`` (e.g. ``lambda: env.true_task``) polled before every action. Locked
    joints get a zero action (the brake ignores them)."""

    controller: ComputedTorqueController

    def __init__(
        self,
        controller: ComputedTorqueController,
        codec: ObservationCodec,
        contract: PolicyContract,
        task_source: "Callable[[], TaskParams] | None" = None,
    ) -> None:
        super().__init__(controller, codec, contract)
        self.task_source = task_source

    def set_task(self, task: "TaskParams | None") -> None:
        self.controller.set_task(task)

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.task_source is not None:
            self.controller.set_task(self.task_source())
        action = super().act(obs)
        action[list(self.controller.locked_joints)] = 0.0
        return action


def computed_torque_policy(
    setup,
    task_source: "Callable[[], TaskParams] | None" = None,
    gains: FeedbackGains | None = None,
    model: RigidBodyModel | None = None,
) -> ComputedTorquePolicy:
    """The ceiling for an env setup (:class:`~metarl_ros.sim.env_config.EnvSetup`).

    Default gains: the env PD's ``kp``/``kd`` in torque space, so the ceiling has the same
    compliance as every other controller it is compared with and only its feed-forward (the
    true model's) differs; pass ``FeedbackGains.critically_damped(DEFAULT_OMEGA, n)``
    (:mod:`metarl_ros.sim.true_dynamics`) for a stiff computed-torque loop.
    """
    model = model or RigidBodyModel.from_robot(setup.robot, setup.robot_path)
    controller = ComputedTorqueController(
        model,
        setup.robot.effort_limits,
        gains or FeedbackGains.torque(setup.law.feedback.kp, setup.law.feedback.kd),
        firmware_gravity=setup.config.gravity_compensation,
        physics_dt=1.0 / setup.config.sim_rate_hz,
    )
    policy = ComputedTorquePolicy.from_setup(setup, controller)
    policy.task_source = task_source
    return policy
