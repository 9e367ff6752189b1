"""The env YAML (``sim/envs/*.yaml``) and the robot and task files it names, loaded and validated.

Import-light on purpose (pydantic, numpy, YAML; no PyBullet, no Gymnasium): the deployed
controller (``onnx_policy_node``) loads the same setup on a robot computer that has neither.
The simulated env (:mod:`metarl_ros.sim.env`) builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat

from metarl_ros.control.law import ControlLaw, FeedbackConfig, ObservationConfig, RewardConfig
from metarl_ros.control.model_features import NUM_BLOCKS
from metarl_ros.core.resources import resolve_path
from metarl_ros.core.schema import ConfigError, StrictModel, load_yaml_model
from metarl_ros.sim.reference import ReferenceConfig
from metarl_ros.sim.robot import RobotSpec, load_robot_spec
from metarl_ros.sim.tasks import TaskSuiteConfig, load_task_suite

DEFAULT_ENV_CONFIG = "sim/envs/iiwa7_compliant.yaml"


class EnvConfig(StrictModel):
    """``sim/envs/*.yaml``. ``robot`` and ``tasks`` are paths relative to this file."""

    robot: str
    tasks: str
    sim_rate_hz: PositiveFloat = 500.0
    control_rate_hz: PositiveFloat = 100.0
    episode_s: PositiveFloat = 4.0
    gravity_compensation: bool = True
    feed_forward: Literal["none", "nominal_model"] = Field(
        default="none",
        description="nominal_model: every effort adds the nominal arm's inverse dynamics along "
        "the reference (control.rigid_body.NominalFeedForward); policies learn a residual on "
        "that model-based controller",
    )
    reference: ReferenceConfig
    feedback: FeedbackConfig
    observation: ObservationConfig = ObservationConfig()
    reward: RewardConfig = RewardConfig()


@dataclass(frozen=True)
class EnvSetup:
    """An env config with the files it references loaded and validated."""

    config: EnvConfig
    robot: RobotSpec
    tasks: TaskSuiteConfig
    path: Path
    robot_path: Path

    @cached_property
    def law(self) -> ControlLaw:
        """The control law's parameters (:mod:`metarl_ros.control.law`)."""
        return ControlLaw(
            observation=self.config.observation,
            feedback=self.config.feedback,
            reward=self.config.reward,
            joint_names=tuple(self.robot.joint_names),
            default_pose=tuple(self.robot.default_pose),
            action_scale=tuple(self.robot.action_scale),
            effort_limits=tuple(self.robot.effort_limits),
            feed_forward=self._feed_forward(),
            model_features=self._model_features(),
        )

    @cached_property
    def rigid_body_model(self):
        """The intact arm's :class:`~metarl_ros.control.rigid_body.RigidBodyModel` (imports
        Pinocchio; built once per setup)."""
        from metarl_ros.control.rigid_body import RigidBodyModel

        return RigidBodyModel.from_robot(self.robot, self.robot_path)

    def _feed_forward(self):
        if self.config.feed_forward == "none":
            return None
        from metarl_ros.control.rigid_body import NominalFeedForward

        return NominalFeedForward(self.rigid_body_model)

    def _model_features(self):
        if not self.config.observation.model_features:
            return None
        from metarl_ros.control.model_features import ModelFeatures

        return ModelFeatures(self.rigid_body_model, self.robot.action_scale)

    @property
    def substeps(self) -> int:
        return int(round(self.config.sim_rate_hz / self.config.control_rate_hz))

    @property
    def control_dt(self) -> float:
        return 1.0 / self.config.control_rate_hz

    @property
    def episode_steps(self) -> int:
        return int(round(self.config.episode_s * self.config.control_rate_hz))

    @property
    def obs_dim(self) -> int:
        """Entries of an observation (layout: :mod:`metarl_ros.control.law`)."""
        return 7 * self.robot.num_joints + (
            NUM_BLOCKS * self.robot.num_joints if self.config.observation.model_features else 0)

    @property
    def act_dim(self) -> int:
        return self.robot.num_joints


def load_env_setup(path: str | Path = DEFAULT_ENV_CONFIG) -> EnvSetup:
    """Load an env YAML and the robot and task files it names."""
    path = resolve_path(path)
    config = load_yaml_model(EnvConfig, path)
    robot_path = resolve_path(config.robot, base=path.parent)
    tasks_path = resolve_path(config.tasks, base=path.parent)
    for field, value, resolved in (
        ("robot", config.robot, robot_path),
        ("tasks", config.tasks, tasks_path),
    ):
        if not resolved.is_file():
            raise ConfigError(
                f"{path}: {field}: file {value!r} not found (relative to {path.parent}, "
                "the working directory or the package share directory)"
            )
    robot = load_robot_spec(robot_path)
    tasks = load_task_suite(tasks_path)
    n = robot.num_joints
    for name, dist in tasks.distributions.items():
        for field in ("damageable_joints", "lockable_joints"):
            bad = [j for j in getattr(dist, field) if j >= n]
            if bad:
                raise ConfigError(
                    f"{tasks_path}: distributions.{name}.{field}: joint indices {bad} out of "
                    f"range for robot {robot.name!r} ({n} joints, 0-based)"
                )
    for section, field in (
        ("reference", "amplitude"),
        ("reference", "centre_jitter"),
        ("feedback", "kp"),
        ("feedback", "kd"),
    ):
        values = getattr(getattr(config, section), field)
        if len(values) != n:
            raise ConfigError(
                f"{path}: {section}.{field}: needs {n} entries (robot has {n} joints)"
            )
        if any(v < 0 for v in values) and section == "feedback":
            raise ConfigError(f"{path}: {section}.{field}: gains must be >= 0")
    ratio = config.sim_rate_hz / config.control_rate_hz
    if abs(ratio - round(ratio)) > 1e-9 or ratio < 1:
        raise ConfigError(
            f"{path}: sim_rate_hz ({config.sim_rate_hz}) must be a whole multiple of "
            f"control_rate_hz ({config.control_rate_hz})"
        )
    return EnvSetup(config=config, robot=robot, tasks=tasks, path=path, robot_path=robot_path)
