"""The privileged teacher (sim/teacher.py): its labels are the feed-forward the fault needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.replay import MultiTaskReplay
from metarl_ros.learning.transitions import TransitionBatch
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams

PAYLOAD = TaskParams(payload_mass=2.5, payload_offset=(0.03, -0.02, 0.06))
WEAK_SHOULDER = TaskParams(motor_strength=(1.0, 0.5, 1.0, 0.7, 1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def compliant():
    return load_env_setup("sim/envs/iiwa7_compliant.yaml")


def _rms_mrad(setup, task: TaskParams, follow_teacher: bool, steps: int = 250) -> float:
    env = ArmTrackingEnv(setup, task=task.normalized(7))
    env.reset(seed=5)
    errors = []
    for _ in range(steps):
        action = env.teacher_action() if follow_teacher else np.zeros(7, np.float32)
        errors.append(env.step(action)[4]["tracking_error"])
    env.close()
    return float(np.sqrt(np.mean(np.square(errors[50:]))) * 1e3)


def test_the_intact_arm_needs_no_residual(compliant):
    env = ArmTrackingEnv(compliant)
    env.reset(seed=2)
    for _ in range(20):
        assert np.abs(env.teacher_action()).max() < 1e-6
        env.step(np.zeros(7, np.float32))
    env.close()


@pytest.mark.parametrize("task", [PAYLOAD, WEAK_SHOULDER], ids=["payload", "weak motors"])
def test_following_the_teacher_tracks_the_faulted_arm_like_the_ceiling(compliant, task):
    """Fed forward open loop, the labels remove most of what the fault costs the
    non-adapting controller (the ceiling's 36-55x headroom, docs/ENVIRONMENT.md)."""
    without = _rms_mrad(compliant, task, follow_teacher=False)
    taught = _rms_mrad(compliant, task, follow_teacher=True)
    assert without > 5.0
    assert taught < 0.2 * without


def test_teacher_labels_follow_their_transitions_through_replay(compliant):
    replay = MultiTaskReplay(1, 200, 3, 2, teacher=True)
    rng = np.random.default_rng(0)
    action = rng.normal(size=(50, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="teacher label"):
        replay.add(0, np.zeros((50, 3)), action, np.zeros(50), np.zeros((50, 3)))
    # each row: the label, then the task's 3n + 10 physical parameters
    parameters = rng.normal(size=(50, 3 * 2 + 10)).astype(np.float32)
    parameters[:, 0] = action[:, 0]  # to find each row's parameters again
    replay.add(0, np.zeros((50, 3)), action, np.zeros(50), np.zeros((50, 3)),
               teacher=np.concatenate([2.0 * action, parameters], axis=1))
    batch = replay.sample([0, 0], 16, rng)
    torch.testing.assert_close(batch.teacher[..., :2], 2.0 * batch.action)
    torch.testing.assert_close(batch.teacher[..., 2], batch.action[..., 0])


@pytest.mark.parametrize("conditioning", ["none", "latent"])
def test_the_teacher_term_pulls_the_actor_towards_its_labels(conditioning):
    torch.manual_seed(0)
    spec = AgentSpec(obs_dim=6, act_dim=2, conditioning=conditioning, latent_dim=3,
                     actor_hidden=(32,), critic_hidden=(32,), encoder_hidden=(16,))
    agent = ConditionedSAC(spec)
    obs = torch.randn(2, 32, 6)
    teacher = torch.tanh(obs[..., :2])  # a learnable function of the observation
    batch = TransitionBatch(obs=obs, action=torch.zeros(2, 32, 2), reward=torch.zeros(2, 32),
                            next_obs=obs, teacher=teacher)
    context = torch.randn(2, 5, spec.transition_dim) if conditioning == "latent" else None
    losses = [agent.update(batch, context, teacher_weight=10.0)["teacher_loss"]
              for _ in range(150)]
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="teacher labels"):
        unlabelled = TransitionBatch(obs=obs, action=batch.action, reward=batch.reward,
                                     next_obs=obs)
        agent.update(unlabelled, context, teacher_weight=1.0)


def test_the_teacher_term_teaches_the_encoder_what_tells_tasks_apart():
    """Two tasks with the same observations but opposite labels, told apart only by their
    contexts: no unconditioned actor gets below a loss of 0.5 (the labels' variance); the
    actor sees z detached, so only the teacher term's gradient through z can get there."""
    torch.manual_seed(0)
    spec = AgentSpec(obs_dim=6, act_dim=2, conditioning="latent", latent_dim=2,
                     actor_hidden=(32,), critic_hidden=(32,), encoder_hidden=(16,))
    agent = ConditionedSAC(spec)
    obs = torch.randn(1, 64, 6).expand(2, -1, -1)
    teacher = torch.tensor([0.5, -0.5]).view(2, 1, 1).expand(-1, 64, 2)
    batch = TransitionBatch(obs=obs, action=torch.zeros(2, 64, 2), reward=torch.zeros(2, 64),
                            next_obs=obs, teacher=teacher)
    context = torch.randn(2, 8, spec.transition_dim) * 0.1
    context[0, :, 0] += 1.0
    context[1, :, 0] -= 1.0
    for _ in range(300):
        stats = agent.update(batch, context, teacher_weight=10.0)
    assert stats["teacher_loss"] < 0.1
