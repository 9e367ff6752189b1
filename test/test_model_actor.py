"""The model features and the structured actor: the true parameters give the true feed-forward,
the features follow the reference and its view, and the parameters are learnable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_ros.control.law import build_observation, reference_view_matrix
from metarl_ros.control.model_features import NUM_BLOCKS, num_fault_parameters
from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.model_actor import ModelFeedForwardActor
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams
from metarl_ros.sim.teacher import FeedForwardTeacher
from metarl_ros.sim.true_dynamics import fault_parameters

N = 7
TASKS = {
    "payload": TaskParams(payload_mass=2.5, payload_offset=(0.03, -0.04, 0.05)),
    "weak_motors": TaskParams(motor_strength=(0.45, 0.6, 1.0, 0.5, 1.0, 1.0, 1.0)),
    "friction": TaskParams(coulomb_friction=(1.2,) * N, viscous_damping=(0.4,) * N),
    "mix": TaskParams(payload_mass=1.0, payload_offset=(0.0, 0.05, 0.0),
                      motor_strength=(1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0),
                      coulomb_friction=(0.5,) * N),
}


@pytest.fixture(scope="module")
def setup():
    return load_env_setup("sim/envs/iiwa7_compliant.yaml")


def _references(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=N) * 0.5, rng.normal(size=N) * 0.6, rng.normal(size=N) * 1.5)
            for _ in range(count)]


def _observations(setup, references) -> torch.Tensor:
    """Observations with the robot off its reference (the actor must not care)."""
    rng = np.random.default_rng(1)
    rows = [build_observation(setup.law, q + rng.normal(size=N) * 0.05, qd + 0.1,
                              (q, qd, qdd), np.zeros(N, np.float32))
            for q, qd, qdd in references]
    return torch.as_tensor(np.stack(rows))


def _actor(setup, cond_dim: int = 0) -> ModelFeedForwardActor:
    view = torch.as_tensor(reference_view_matrix(setup.law), dtype=torch.float32)
    return ModelFeedForwardActor(setup.obs_dim + cond_dim, (32, 32), N, view, setup.obs_dim)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_true_parameters_give_the_teachers_labels(setup, name):
    """Features x structure x fault_parameters == the ceiling's feed-forward (teacher)."""
    task = TASKS[name]
    references = _references(12)
    actor = _actor(setup)
    theta = torch.as_tensor(fault_parameters(task, N), dtype=torch.float32)
    viewed = actor.viewed(_observations(setup, references))
    action = actor.structured_action(viewed, theta.expand(len(references), -1))
    teacher = FeedForwardTeacher(setup)
    labels = np.stack([teacher(task, ref) for ref in references])
    assert np.abs(labels).max() > 0.05  # the fault needs a feed-forward at all
    np.testing.assert_allclose(action.clamp(-1, 1).detach().numpy(), labels, atol=2e-4)


def test_intact_parameters_are_zero_and_give_no_action(setup):
    actor = _actor(setup)
    obs = _observations(setup, _references(4))
    assert not fault_parameters(None, N).any()
    np.testing.assert_array_equal(actor(obs).detach().numpy(), 0.0)  # at initialization


def test_features_batch_equals_single_instants(setup):
    features = setup.law.model_features
    references = _references(3)
    stacked = features(*(np.stack(column) for column in zip(*references)))
    assert stacked.shape == (NUM_BLOCKS * 3, N)
    for k, ref in enumerate(references):
        np.testing.assert_allclose(stacked.reshape(NUM_BLOCKS, 3, N)[:, k].reshape(-1),
                                   features(*ref), rtol=1e-6)


def test_reference_view_keeps_the_features(setup):
    q, qd, qdd = _references(1)[0]
    on = build_observation(setup.law, q, qd, (q, qd, qdd), np.zeros(N, np.float32))
    off = build_observation(setup.law, q + 0.1, qd - 0.2, (q, qd, qdd), np.zeros(N, np.float32))
    view = reference_view_matrix(setup.law)
    assert off.shape == (setup.obs_dim,) == (20 * N,)
    np.testing.assert_allclose(view @ off, on, atol=1e-6)
    np.testing.assert_array_equal(off[7 * N:], on[7 * N:])  # features are of the reference


def test_parameters_are_learned_from_labels(setup):
    """Regression on the teacher's labels of one payload task recovers its mass: what the
    structure promises (the parameters are identifiable from the features)."""
    torch.manual_seed(0)
    task = TASKS["mix"]
    references = _references(256, seed=3)
    teacher = FeedForwardTeacher(setup)
    labels = torch.as_tensor(np.stack([teacher(task, ref) for ref in references]))
    obs = _observations(setup, references)
    actor = _actor(setup)
    optimizer = torch.optim.Adam([actor.parameter_bias], lr=0.02)
    for _ in range(600):
        loss = (actor(obs) - labels).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theta = actor.physical_parameters(obs[:1])[0].detach().numpy()
    assert loss.item() < 1e-4
    assert theta[N] == pytest.approx(1.0, abs=0.1)  # payload mass, kg
    assert theta[1] == pytest.approx(1.0 / 0.5 - 1.0, abs=0.1)  # weak shoulder: 1/s - 1


def test_condition_drives_the_parameters(setup):
    """With a condition the parameters are a function of it (not of the state), and the
    teacher's gradient reaches that function."""
    actor = _actor(setup, cond_dim=3)
    obs = _observations(setup, _references(5))
    cond = torch.randn(5, 3)
    x = torch.cat([obs, cond], dim=-1)
    assert actor.physical_parameters(x).shape == (5, num_fault_parameters(N))
    actor(x).pow(2).sum().backward()  # zero-initialized last layer: its weights get gradient
    assert actor.parameter_net[-1].weight.grad is not None
    same_cond = torch.cat([obs, cond[:1].expand(5, -1)], dim=-1)
    theta = actor.physical_parameters(same_cond)
    torch.testing.assert_close(theta, theta[:1].expand(5, -1))


def test_model_head_needs_the_features():
    tracking = load_env_setup("sim/envs/iiwa7_tracking.yaml")
    spec = AgentSpec(obs_dim=tracking.obs_dim, act_dim=N, conditioning="none",
                     actor_head="model")
    with pytest.raises(ValueError, match="model_features: true"):
        ConditionedSAC(spec)


def _oracle_batch(setup, task: TaskParams, count: int):
    """A (1, count) batch of one task's transitions with its teacher rows (label, theta)."""
    from metarl_ros.learning.transitions import TransitionBatch

    references = _references(count, seed=5)
    teacher = FeedForwardTeacher(setup)
    rows = np.stack([np.concatenate([teacher(task, ref), fault_parameters(task, N)])
                     for ref in references]).astype(np.float32)
    obs = _observations(setup, references)
    batch = TransitionBatch(obs=obs[None], action=torch.zeros(1, count, N), next_obs=obs[None],
                            reward=torch.zeros(1, count), teacher=torch.as_tensor(rows)[None])
    return batch, torch.as_tensor(task.oracle_vector(N))[None]


def test_parameter_weight_regresses_the_estimate_on_the_true_parameters(setup):
    """The oracle's estimate for a task moves to that task's parameters under the parameter
    term (and not without it, in as many updates)."""
    from metarl_ros.sim.tasks import oracle_vector_size

    task = TASKS["mix"]
    batch, condition = _oracle_batch(setup, task, 64)
    truth = fault_parameters(task, N)
    errors = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        spec = AgentSpec(obs_dim=setup.obs_dim, act_dim=N, conditioning="oracle",
                         oracle_dim=oracle_vector_size(N), actor_hidden=(32, 32),
                         critic_hidden=(32, 32), actor_view="reference", actor_head="model",
                         actor_lr=3e-3)
        agent = ConditionedSAC(spec, torch.as_tensor(reference_view_matrix(setup.law),
                                                     dtype=torch.float32))
        for _ in range(150):
            stats = agent.update(batch, task_condition=condition, parameter_weight=weight)
        x = torch.cat([batch.obs[0, :1], condition], dim=-1)
        estimate = agent.actor.physical_parameters(x)[0].detach().numpy()
        errors[weight] = abs(estimate[N] - truth[N])  # payload mass, kg
    assert errors[10.0] < 0.1 < errors[0.0], errors
    assert stats["parameter_loss"] > 0.0


def test_parameter_weight_needs_the_model_head(setup):
    from metarl_ros.learning.config import TrainConfig

    with pytest.raises(ValueError, match="actor_head: model"):
        TrainConfig(method="robust", agent={"actor_head": "mlp"})
    TrainConfig(method="robust", agent={"actor_head": "mlp"}, parameter_weight=0.0)


def test_a_model_whose_env_changed_its_observation_is_refused_by_name(tmp_path):
    """Evaluation names the mismatch instead of failing inside a matrix product."""
    import yaml
    from bag_helpers import write_tiny_env

    from metarl_ros.evaluation.runner import load_method_models
    from metarl_ros.learning.checkpoint import CheckpointError

    from metarl_ros.learning.config import AgentConfig, TrainConfig
    from metarl_ros.learning.trainer import Trainer

    env = write_tiny_env(tmp_path)
    config = TrainConfig(method="nominal", env=str(env), envs_per_iteration=2, eval_tasks=2,
                         replay_capacity_per_task=1000, torch_threads=1,
                         fault_episode_fraction=0.0,
                         agent=AgentConfig(actor_hidden=[32, 32], critic_hidden=[32, 32]))
    trainer = Trainer(config, tmp_path / "models" / "nominal", progress=False)
    trainer.write_final_model()  # an untrained model file is enough to reach the check
    trainer.rollout.close()
    trainer.eval_rollout.close()
    data = yaml.safe_load(env.read_text())
    data["observation"]["model_features"] = False
    env.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=r"140/7 do not match .* \(49/7\): the env file "
                                              r"changed"):
        load_method_models(tmp_path / "models", ["nominal"])
