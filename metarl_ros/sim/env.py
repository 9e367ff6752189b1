"""Gymnasium environment: joint-space reference tracking with a torque-controlled arm.

Importing this module registers it with Gymnasium as ``metarl_ros/ArmTracking-v0``
(:data:`metarl_ros.ENV_ID`).

**Why joint space.** ros2_control's effort interfaces and ``/joint_states`` are joint-space, the
reference is then unambiguous for a redundant 7-DOF arm, and the tracking error is directly
interpretable per joint. (End-effector tracking would let the arm route around a locked joint;
that is left for a later robot/task.)

**Timing.** Physics at ``sim_rate_hz`` (500 Hz), policy at ``control_rate_hz`` (100 Hz): each
:meth:`ArmTrackingEnv.step` holds the action for ``sim_rate_hz / control_rate_hz`` physics steps.
Episodes last ``episode_s`` (4 s = 400 steps); they are truncated, never terminated.

**Action** ``a`` in [-1, 1]^n (n = 7): normalized joint torques, added to a fixed joint-space
PD feedback on the reference (residual control, as in residual RL and as rsl_rl/RMA-style
policies act through a PD loop): ``tau = Kp * (q_ref - q) + Kd * (qd_ref - qd) + a *
action_scale``, computed from the measured state by
:func:`metarl_ros.control.law.effort_command` (the same function the ROS nodes use); then the
firmware adds nominal gravity compensation and the motors limit it (see
:mod:`metarl_ros.sim.arm_sim`). ``feedback.kp = kd = 0`` gives pure torque control. The PD
alone is the *classical* controller: it tracks the intact robot but sags under a payload and
loses stiffness with a weak motor; the policy's job is to win that back.

**Observation** (float32, 7n = 49 entries) from the *measured* (noisy) joint state and the
reference at the current time, laid out by :func:`metarl_ros.control.law.build_observation`:
joint positions relative to the default pose, velocities, position and velocity errors, the
reference velocity and acceleration, the previous action (scales in the env YAML).

**Reward** from the *true* state, :func:`metarl_ros.control.law.tracking_reward`: the log form
(shipped) ``-ln(1 + e / tracking_scale_rad) - effort_weight * mean(a^2)`` with the tracking
error ``e`` saturated at ``max_error_rad``. The log form values halving the error equally at
every scale, so the precise tracking of easy tasks is not drowned out by the large errors of
hard ones in a critic shared across tasks. The error saturates so that a flailing arm early in
training does not dominate the critic.

**Info** has ``tracking_error`` (||q_ref - q||_2 in rad, true state), ``time_s``,
``faults`` (labels of fault events that struck during the step) and ``task`` (the true task,
for oracle baselines and diagnostics only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from metarl_ros import ENV_ID
from metarl_ros.control.law import build_observation, effort_command, tracking_reward
from metarl_ros.sim.arm_sim import ArmSimulation, JointReading
from metarl_ros.sim.env_config import (
    DEFAULT_ENV_CONFIG,
    EnvSetup,
    load_env_setup,
)
from metarl_ros.sim.reference import MultiSineReference
from metarl_ros.sim.tasks import FaultEvent, TaskParams
from metarl_ros.sim.teacher import FeedForwardTeacher
from metarl_ros.sim.true_dynamics import fault_parameters


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
        self._teacher: FeedForwardTeacher | None = None
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
            self.setup.law,
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
        reward = tracking_reward(self.setup.law, error, action)
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

    def teacher_action(self) -> np.ndarray:
        """The privileged label for the action about to be taken: the true model's
        feed-forward on the current reference as a residual action, (n,) float32
        (:class:`~metarl_ros.sim.teacher.FeedForwardTeacher`; training only)."""
        if self._reference_now is None:
            raise RuntimeError("call reset() before teacher_action()")
        if self._teacher is None:
            self._teacher = FeedForwardTeacher(self.setup)
        return self._teacher(self.sim.task, self._reference_now)

    def teacher_targets(self) -> np.ndarray:
        """Everything privileged a training step stores, (n + 3n + 10,) float32: the
        :meth:`teacher_action` label, then the true task's physical parameters
        (:func:`~metarl_ros.sim.true_dynamics.fault_parameters`, the target of a
        model-structured actor's estimate). Training only."""
        label = self.teacher_action()
        return np.concatenate([label, fault_parameters(self.sim.task, label.shape[0])]
                              ).astype(np.float32)

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
            self.setup.law,
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


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=ArmTrackingEnv)
