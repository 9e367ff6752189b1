"""The control law shared by the simulated env and the robot: observation, effort, reward.

Pure numpy on a :class:`ControlLaw` (an env setup's ``law``), so the env
(:mod:`metarl_ros.sim.env`), the ROS control loop (:mod:`metarl_ros.control.controller`) and
offline retraining from bags compute them with the same code, and a robot computer needs neither
PyBullet nor Gymnasium to run them (a test checks that ``onnx_policy_node`` imports neither).

**Effort** (N*m), residual control: a fixed joint-space PD feedback on the reference plus the
normalized action ``a`` in [-1, 1]^n scaled per joint::

    tau = Kp * (q_ref - q) + Kd * (qd_ref - qd) + a * action_scale

**Observation** (float32, 7n or 20n entries, blocks of n in joint order), from the *measured* joint
state and the reference at the current time::

    [ q - default_pose,
      qd * velocity_scale,
      (q_ref - q) * position_error_scale,
      (qd_ref - qd) * velocity_error_scale,
      qd_ref * velocity_scale,
      qdd_ref * acceleration_scale,
      previous action,
      model features ]      (only with ``observation.model_features``: 13n entries,
                             :mod:`metarl_ros.control.model_features`)

**Reward**, with ``e = min(||q_ref - q||_2, max_error_rad)``::

    kind: log      r = -ln(1 + e / tracking_scale_rad) - effort_weight * mean(a^2)
    kind: linear   r = -e / tracking_scale_rad         - effort_weight * mean(a^2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import Field, PositiveFloat

from metarl_ros.control.model_features import NUM_BLOCKS
from metarl_ros.core.schema import StrictModel


class ObservationConfig(StrictModel):
    """Scales of the observation blocks (layout: module doc)."""

    position_error_scale: PositiveFloat = 10.0
    velocity_error_scale: PositiveFloat = 1.0
    velocity_scale: PositiveFloat = 0.2
    acceleration_scale: PositiveFloat = 0.2
    model_features: bool = Field(
        default=False,
        description="append the nominal model's torques along the reference (13 blocks of n, "
        "control.model_features; needs the robot's rigid-body model): the factors of the "
        "feed-forward a fault needs, for a policy that infers only the fault's parameters "
        "(agent.actor_head: model)",
    )


class RewardConfig(StrictModel):
    """The tracking reward (formula: module doc)."""

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


@dataclass(frozen=True)
class ControlLaw:
    """Everything the law and the control loop read of a setup: the env config's sections and
    the robot's joints.

    Per-joint tuples have one entry per joint, in ``joint_names`` order: ``default_pose``
    (rad), ``action_scale`` (N*m per unit of action), ``effort_limits`` (N*m). Built by
    :attr:`metarl_ros.sim.env_config.EnvSetup.law`.
    """

    observation: ObservationConfig
    feedback: FeedbackConfig
    reward: RewardConfig
    joint_names: tuple[str, ...]
    default_pose: tuple[float, ...]
    action_scale: tuple[float, ...]
    effort_limits: tuple[float, ...]
    feed_forward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = field(
        default=None, compare=False)
    """Optional model feed-forward ``tau_ff(q_ref, qd_ref, qdd_ref)`` (N*m, (n,)) added to
    every effort, e.g. :class:`metarl_ros.control.rigid_body.NominalFeedForward`: the
    policy's action is then a residual on a model-based controller."""
    model_features: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = field(
        default=None, compare=False)
    """With ``observation.model_features``: the observation's last block
    (:class:`metarl_ros.control.model_features.ModelFeatures`)."""

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @cached_property
    def gains(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(kp, kd, action_scale)`` as float64 arrays, (n,) each, made once: a control tick
        converts no lists."""
        arrays = tuple(np.array(v, dtype=np.float64) for v in (
            self.feedback.kp, self.feedback.kd, self.action_scale))
        for array in arrays:
            array.flags.writeable = False
        return arrays  # type: ignore[return-value]

    @cached_property
    def default_pose_array(self) -> np.ndarray:
        """``default_pose`` as a read-only float64 array (n,), made once."""
        array = np.array(self.default_pose, dtype=np.float64)
        array.flags.writeable = False
        return array

    @property
    def obs_dim(self) -> int:
        """Entries of an observation: 7n, plus ``NUM_BLOCKS * n`` model features."""
        n = self.num_joints
        return 7 * n + (0 if self.model_features is None else NUM_BLOCKS * n)


@dataclass(frozen=True)
class ReferenceTerms:
    """What the law computes from one reference instant alone (:func:`reference_terms`).

    A control loop computes them when the reference arrives, before the joint state they
    will be combined with, so the rigid-body model stays off the sensor-to-command path;
    :func:`build_observation` and :func:`effort_command` take them instead of recomputing.
    """

    features: np.ndarray | None
    """the observation's model features, (NUM_BLOCKS * n,) float32; None without them."""
    feed_forward: np.ndarray | None
    """the law's model feed-forward, (n,) float64 N*m; None without one."""


def reference_terms(law: ControlLaw,
                    reference: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ReferenceTerms:
    """The rigid-body model's part of the law at one reference instant (each input (n,))."""
    q_ref, qd_ref, qdd_ref = reference
    return ReferenceTerms(
        None if law.model_features is None else law.model_features(q_ref, qd_ref, qdd_ref),
        None if law.feed_forward is None else law.feed_forward(q_ref, qd_ref, qdd_ref))


def build_observation(
    law: ControlLaw,
    position: np.ndarray,
    velocity: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    previous_action: np.ndarray,
    terms: ReferenceTerms | None = None,
) -> np.ndarray:
    """The policy observation from a joint reading and the reference (layout: module doc).

    Shared by the env and the ROS nodes, so the two cannot disagree. All inputs shape (n,);
    ``terms``: :func:`reference_terms` of ``reference``, if already computed.
    """
    obs_cfg = law.observation
    q_ref, qd_ref, qdd_ref = reference
    blocks = [
        position - law.default_pose_array,
        velocity * obs_cfg.velocity_scale,
        (q_ref - position) * obs_cfg.position_error_scale,
        (qd_ref - velocity) * obs_cfg.velocity_error_scale,
        qd_ref * obs_cfg.velocity_scale,
        qdd_ref * obs_cfg.acceleration_scale,
        previous_action,
    ]
    if law.model_features is not None:
        blocks.append(law.model_features(q_ref, qd_ref, qdd_ref) if terms is None
                      else terms.features)
    return np.concatenate(blocks).astype(np.float32)


def effort_command(
    law: ControlLaw,
    action: np.ndarray,
    position: np.ndarray,
    velocity: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    terms: ReferenceTerms | None = None,
) -> np.ndarray:
    """Joint efforts (N*m, shape (n,)) for a normalized action: PD feedback plus the action
    (plus the model feed-forward, if the law has one).

    Shared by the env and the ROS nodes. Not clipped: the motors (or the node's safety clamp)
    limit it. ``terms``: :func:`reference_terms` of a single ``reference`` instant, if
    already computed.
    """
    kp, kd, action_scale = law.gains
    q_ref, qd_ref, qdd_ref = reference
    effort = kp * (q_ref - position) + kd * (qd_ref - velocity) + action * action_scale
    if law.feed_forward is None:
        return effort
    if terms is not None:
        return effort + terms.feed_forward
    if np.ndim(q_ref) == 1:
        return effort + law.feed_forward(q_ref, qd_ref, qdd_ref)
    # a batch of instants (rows): one model evaluation each
    return effort + np.stack([law.feed_forward(*row) for row in zip(
        np.atleast_2d(q_ref), np.atleast_2d(qd_ref), np.atleast_2d(qdd_ref))])


def tracking_reward(law: ControlLaw, tracking_error: float, action: np.ndarray) -> float:
    """Reward of one control step (formula: module doc)."""
    reward_cfg = law.reward
    effort = float(np.dot(action, action)) / action.shape[0]
    error = min(tracking_error, reward_cfg.max_error_rad)
    if reward_cfg.kind == "log":
        return (
            -math.log1p(error / reward_cfg.tracking_scale_rad) - reward_cfg.effort_weight * effort
        )
    return -error / reward_cfg.tracking_scale_rad - reward_cfg.effort_weight * effort


def reference_view_matrix(law: ControlLaw) -> np.ndarray:
    """The linear map, shape (obs_dim, obs_dim), from an observation to the observation the
    robot would have if it were exactly on its reference: ``q := q_ref``, ``qd := qd_ref``, so
    the error blocks are zero and the reference blocks, the previous action and the model
    features (all computed on the reference) are kept.

    A controller that acts on this view is pure feed-forward: it cannot react to the
    instantaneous tracking error, so the loop's stiffness is the PD feedback's alone and a
    fault can only be compensated through what the controller has *inferred* (adaptation), not
    by stiffening. Layout of the blocks: module doc.
    """
    n = len(law.joint_names)
    obs = law.observation
    eye = np.eye(n)
    size = law.obs_dim
    view = np.zeros((size, size))

    def block(row: int, col: int, value: np.ndarray) -> None:
        view[row * n:(row + 1) * n, col * n:(col + 1) * n] = value

    block(0, 0, eye)  # q_ref - default = (q - default) + (q_ref - q)
    block(0, 2, eye / obs.position_error_scale)
    block(1, 4, eye)  # qd_ref * velocity_scale
    block(4, 4, eye)
    block(5, 5, eye)
    block(6, 6, eye)
    view[7 * n:, 7 * n:] = np.eye(size - 7 * n)
    return view
