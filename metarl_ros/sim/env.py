"""Gymnasium environment: joint-space reference tracking with a torque-controlled arm.

Registered as ``metarl_ros/ArmTracking-v0`` (``import metarl_ros`` first).

**Why joint space.** ros2_control's effort interfaces and ``/joint_states`` are joint-space, the
reference is then unambiguous for a redundant 7-DOF arm, and the tracking error is directly
interpretable per joint. (End-effector tracking would let the arm route around a locked joint;
that is left for a later robot/task.)

**Timing.** Physics at ``sim_rate_hz`` (500 Hz), policy at ``control_rate_hz`` (100 Hz): each
:meth:`ArmTrackingEnv.step` holds the action for ``sim_rate_hz / control_rate_hz`` physics steps.
Episodes last ``episode_s`` (4 s = 400 steps); they are truncated, never terminated.

**Action** ``a`` in [-1, 1]^n (n = 7): normalized joint torques, added to a fixed joint-space
PD feedback on the reference (residual control, as in residual RL and as rsl_rl/RMA-style
policies act through a PD loop). The commanded effort is::

    tau = Kp * (q_ref - q) + Kd * (qd_ref - qd) + a * action_scale      (N*m)

computed by :func:`effort_command` from the measured state (the same function the ROS nodes
use), then the firmware adds nominal gravity compensation and the motors limit it (see
:mod:`metarl_ros.sim.arm_sim`). ``feedback.kp = kd = 0`` gives pure torque control. The PD
alone is the *classical* controller: it tracks the intact robot but sags under a payload and
loses stiffness with a weak motor; the policy's job is to win that back.

**Observation** (float32, 7n = 49 entries, blocks of n in joint order), from the *measured*
(noisy) joint state and the reference at the current time::

    [ q - default_pose,
      qd * velocity_scale,
      (q_ref - q) * position_error_scale,
      (qd_ref - qd) * velocity_error_scale,
      qd_ref * velocity_scale,
      qdd_ref * acceleration_scale,
      previous action ]

**Reward** (from the true state), with ``e = min(||q_ref - q||_2, max_error_rad)``::

    kind: log      r = -ln(1 + e / tracking_scale_rad) - effort_weight * mean(a^2)   (shipped)
    kind: linear   r = -e / tracking_scale_rad         - effort_weight * mean(a^2)

The log form values halving the error equally at every scale, so the precise tracking of easy
tasks is not drowned out by the large errors of hard ones in a critic shared across tasks. The
error saturates so that a flailing arm early in training does not dominate the critic.

**Info** has ``tracking_error`` (||q_ref - q||_2 in rad, true state), ``time_s``,
``faults`` (labels of fault events that struck during the step) and ``task`` (the true task,
for oracle baselines and diagnostics only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from pydantic import Field, PositiveFloat

from metarl_ros.config import ConfigError, StrictModel, load_yaml_model
from metarl_ros.resources import resolve_path
from metarl_ros.sim.arm_sim import ArmSimulation, JointReading
from metarl_ros.sim.reference import MultiSineReference, ReferenceConfig
from metarl_ros.sim.robot import RobotSpec, load_robot_spec
from metarl_ros.sim.tasks import FaultEvent, TaskParams, TaskSuiteConfig, load_task_suite

DEFAULT_ENV_CONFIG = "sim/envs/iiwa7_tracking.yaml"


class ObservationConfig(StrictModel):
    position_error_scale: PositiveFloat = 10.0
    velocity_error_scale: PositiveFloat = 1.0
    velocity_scale: PositiveFloat = 0.2
    acceleration_scale: PositiveFloat = 0.2


class RewardConfig(StrictModel):
    kind: Literal["linear", "log"] = Field(
        default="linear", description="linear: -min(e, max)/scale; log: -ln(1 + e/scale)"
    )
    tracking_scale_rad: PositiveFloat = 0.1
    max_error_rad: PositiveFloat = 1.0
    effort_weight: float = Field(default=0.05, ge=0.0)


class FeedbackConfig(StrictModel):
    """Fixed joint-space PD feedback the policy's torques are added to (per joint)."""

    kp: list[float] = Field(description="N*m/rad")
    kd: list[float] = Field(description="N*m*s/rad")


class EnvConfig(StrictModel):
    """``sim/envs/*.yaml``. ``robot`` and ``tasks`` are paths relative to this file."""

    robot: str
    tasks: str
    sim_rate_hz: PositiveFloat = 500.0
    control_rate_hz: PositiveFloat = 100.0
    episode_s: PositiveFloat = 4.0
    gravity_compensation: bool = True
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
        return 7 * self.robot.num_joints

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


def build_observation(
    setup: EnvSetup,
    position: np.ndarray,
    velocity: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    previous_action: np.ndarray,
) -> np.ndarray:
    """The policy observation from a joint reading and the reference (layout: module doc).

    Shared by the env and the ROS nodes, so the two cannot disagree. All inputs shape (n,).
    """
    obs_cfg = setup.config.observation
    q_ref, qd_ref, qdd_ref = reference
    return np.concatenate(
        [
            position - np.asarray(setup.robot.default_pose),
            velocity * obs_cfg.velocity_scale,
            (q_ref - position) * obs_cfg.position_error_scale,
            (qd_ref - velocity) * obs_cfg.velocity_error_scale,
            qd_ref * obs_cfg.velocity_scale,
            qdd_ref * obs_cfg.acceleration_scale,
            previous_action,
        ]
    ).astype(np.float32)


def effort_command(
    setup: EnvSetup,
    action: np.ndarray,
    position: np.ndarray,
    velocity: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Joint efforts (N*m, shape (n,)) for a normalized action: PD feedback plus the action.

    Shared by the env and the ROS nodes. Not clipped: the motors (or the node's safety clamp)
    limit it.
    """
    feedback = setup.config.feedback
    q_ref, qd_ref, _ = reference
    return (
        np.asarray(feedback.kp) * (q_ref - position)
        + np.asarray(feedback.kd) * (qd_ref - velocity)
        + action * np.asarray(setup.robot.action_scale)
    )


def tracking_reward(setup: EnvSetup, tracking_error: float, action: np.ndarray) -> float:
    """Reward of one control step (formula: module doc)."""
    reward_cfg = setup.config.reward
    effort = float(np.dot(action, action)) / action.shape[0]
    error = min(tracking_error, reward_cfg.max_error_rad)
    if reward_cfg.kind == "log":
        return (
            -math.log1p(error / reward_cfg.tracking_scale_rad) - reward_cfg.effort_weight * effort
        )
    return -error / reward_cfg.tracking_scale_rad - reward_cfg.effort_weight * effort


class ArmTrackingEnv(gym.Env):
    """Track a random joint-space reference under a task's physical parameters.

    Args:
        config: env YAML path or a loaded :class:`EnvSetup`.
        task: physical parameters at the start of every episode (default: intact robot).
            ``reset(options={"task": ..., "faults": [...]})`` overrides it per episode.
        gui: show the PyBullet GUI.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: str | Path | EnvSetup = DEFAULT_ENV_CONFIG,
        task: TaskParams | None = None,
        gui: bool = False,
    ) -> None:
        super().__init__()
        self.setup = config if isinstance(config, EnvSetup) else load_env_setup(config)
        robot = self.setup.robot
        n = robot.num_joints
        self.sim = ArmSimulation(
            robot,
            sim_rate_hz=self.setup.config.sim_rate_hz,
            gravity_compensation=self.setup.config.gravity_compensation,
            gui=gui,
            robot_file=self.setup.robot_path,
        )
        self.default_task = (task or TaskParams()).normalized(n)
        self.default_task.validate(n)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(n,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, shape=(self.setup.obs_dim,), dtype=np.float32
        )
        self._action_scale = np.asarray(robot.action_scale)
        self._default_pose = np.asarray(robot.default_pose)
        self._lower = np.asarray(robot.position_lower)
        self._upper = np.asarray(robot.position_upper)
        self._previous_action = np.zeros(n, dtype=np.float32)
        self._reference: MultiSineReference | None = None
        self._reference_now: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._measured: JointReading | None = None
        self._steps = 0

    # ------------------------------------------------------------------ gym API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode.

        ``options``: ``task`` (TaskParams), ``faults`` (list of FaultEvent).
        """
        super().reset(seed=seed)
        options = options or {}
        if seed is not None:
            self.sim._rng = np.random.default_rng(seed + 1)
        self._reference = MultiSineReference.sample(
            self.setup.config.reference,
            self._default_pose,
            self._lower,
            self._upper,
            self.np_random,
        )
        self._reference_now = self._reference.evaluate(0.0)
        q_ref, qd_ref, _ = self._reference_now
        self.sim.reset(q_ref, qd_ref, task=options.get("task", self.default_task))
        self.sim.schedule(list(options.get("faults", [])))
        self._previous_action = np.zeros(self.setup.act_dim, dtype=np.float32)
        self._steps = 0
        return self._observe(), self._info([])

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._reference is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.action_space.shape:
            raise ValueError(
                f"action must have shape {self.action_space.shape}, got {action.shape}"
            )
        if not np.isfinite(action).all():
            raise ValueError("action contains non-finite values")
        action = np.minimum(np.maximum(action, -1.0), 1.0)
        assert self._reference_now is not None and self._measured is not None
        effort = effort_command(
            self.setup,
            action,
            self._measured.position,
            self._measured.velocity,
            self._reference_now,
        )
        events = self.sim.step(effort, substeps=self.setup.substeps)
        self._reference_now = self._reference.evaluate(self.sim.time_s)
        self._steps += 1
        self._previous_action = action
        error = self.tracking_error()
        reward = tracking_reward(self.setup, error, action)
        truncated = self._steps >= self.setup.episode_steps
        return self._observe(), reward, False, truncated, self._info(events, error)

    def close(self) -> None:
        self.sim.close()

    # ------------------------------------------------------------------ helpers

    def set_task(self, task: TaskParams) -> None:
        """Change the physical parameters now (a fault or a payload pick-up)."""
        self.sim.set_task(task)

    def schedule_faults(self, events: list[FaultEvent]) -> None:
        self.sim.schedule(events)

    @property
    def true_task(self) -> TaskParams:
        """Ground truth, for oracle baselines and diagnostics only."""
        return self.sim.task

    def reference_at(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self._reference is not None
        return self._reference.evaluate(t)

    def tracking_error(self) -> float:
        """||q_ref - q||_2 now, in rad, from the true state."""
        assert self._reference_now is not None
        return float(np.linalg.norm(self._reference_now[0] - self.sim.true_state().position))

    def _observe(self) -> np.ndarray:
        reading = self._measured = self.sim.measure()
        assert self._reference_now is not None
        return build_observation(
            self.setup,
            reading.position,
            reading.velocity,
            self._reference_now,
            self._previous_action,
        )

    def _info(self, events: list[FaultEvent], error: float | None = None) -> dict[str, Any]:
        return {
            "tracking_error": self.tracking_error() if error is None else error,
            "time_s": self.sim.time_s,
            "faults": [event.label for event in events],
            "task": self.sim.task,
        }
