"""Warm start (curriculum): a conditioned agent built from an unconditioned one."""

import copy

import pytest
import torch

from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.checkpoint import CheckpointError
from metarl_ros.learning.transitions import TransitionBatch
from metarl_ros.learning.warm_start import warm_start

OBS, ACT = 6, 2


def _spec(conditioning: str, **kw) -> AgentSpec:
    return AgentSpec(
        obs_dim=OBS,
        act_dim=ACT,
        conditioning=conditioning,
        latent_dim=3,
        oracle_dim=5,
        encoder_hidden=(8,),
        actor_hidden=(16, 16),
        critic_hidden=(16, 16),
        **kw,
    )


@pytest.fixture
def source() -> ConditionedSAC:
    torch.manual_seed(0)
    agent = ConditionedSAC(_spec("none"))
    with torch.no_grad():
        agent.log_alpha.fill_(-3.0)
    return agent


@pytest.mark.parametrize("conditioning, cond_dim", [("latent", 3), ("oracle", 5), ("none", 0)])
def test_warm_started_agent_is_the_source_for_any_condition(source, conditioning, cond_dim):
    torch.manual_seed(1)
    agent = ConditionedSAC(_spec(conditioning))
    before_encoder = (
        {k: v.clone() for k, v in agent.encoder.state_dict().items()}
        if agent.encoder is not None
        else {}
    )
    warm_start(agent, source.state_dict(), vars(source.spec), "source")
    obs, action = torch.randn(32, OBS), torch.rand(32, ACT) * 2 - 1
    cond = torch.randn(32, cond_dim) * 10.0  # large: zero weights must make it irrelevant
    torch.testing.assert_close(
        agent.act(obs, cond, True), source.act(obs, torch.zeros(32, 0), True), rtol=0, atol=0
    )
    torch.testing.assert_close(
        agent.critic(torch.cat([obs, cond], -1), action),
        source.critic(obs, action),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        agent.critic_target(torch.cat([obs, cond], -1), action),
        source.critic_target(obs, action),
        rtol=0,
        atol=1e-6,
    )
    assert float(agent.log_alpha) == -3.0
    for key, value in before_encoder.items():  # the encoder is not touched
        assert torch.equal(agent.encoder.state_dict()[key], value)


def test_condition_columns_start_at_zero_and_then_learn(source):
    agent = ConditionedSAC(_spec("oracle"))
    warm_start(agent, source.state_dict(), vars(source.spec), "source")
    first = agent.actor.trunk[0].weight  # (hidden, obs + cond)
    assert torch.count_nonzero(first[:, OBS:]) == 0
    assert first.requires_grad


def _bellman_gradient_to_encoder(agent: ConditionedSAC) -> float:
    """Norm of d(sum Q)/d(encoder parameters) through a reparameterized z, KL left out."""
    torch.manual_seed(2)
    context = torch.randn(4, 10, agent.spec.transition_dim)
    mu, var = agent.encoder.posterior(context)
    z = (mu + var.sqrt() * torch.randn_like(mu)).repeat_interleave(8, 0)  # (32, L)
    obs, action = torch.randn(32, OBS), torch.rand(32, ACT) * 2 - 1
    agent.encoder.zero_grad(set_to_none=False)
    agent.critic(torch.cat([obs, z], -1), action).sum().backward()
    return float(sum(p.grad.norm() ** 2 for p in agent.encoder.parameters()) ** 0.5)


def test_random_critic_condition_opens_a_bellman_gradient_and_keeps_the_policy(source):
    zero = ConditionedSAC(_spec("latent"))
    warm_start(zero, source.state_dict(), vars(source.spec), "source")
    assert _bellman_gradient_to_encoder(zero) == 0.0  # the saddle that collapses the latent

    torch.manual_seed(1)
    agent = ConditionedSAC(_spec("latent"))
    fresh = agent.critic.net.layers[0].weight.detach().clone()  # (2, obs + z + act, hidden)
    warm_start(agent, source.state_dict(), vars(source.spec), "source", critic_condition="random")
    assert _bellman_gradient_to_encoder(agent) > 0.0
    first = agent.critic.net.layers[0].weight.detach()
    assert torch.equal(first[:, OBS : OBS + 3], fresh[:, OBS : OBS + 3])
    assert torch.equal(first, agent.critic_target.net.layers[0].weight)
    obs, action = torch.randn(32, OBS), torch.rand(32, ACT) * 2 - 1
    cond = torch.randn(32, 3) * 10.0
    # the policy is still exactly the source; the critic is the source's at z = 0
    torch.testing.assert_close(
        agent.act(obs, cond, True), source.act(obs, torch.zeros(32, 0), True), rtol=0, atol=0
    )
    torch.testing.assert_close(
        agent.critic(torch.cat([obs, torch.zeros(32, 3)], -1), action),
        source.critic(obs, action),
        rtol=0,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="critic_condition"):
        warm_start(agent, source.state_dict(), vars(source.spec), "source", critic_condition="x")


def test_mismatched_networks_are_refused(source):
    wider = ConditionedSAC(
        AgentSpec(
            obs_dim=OBS,
            act_dim=ACT,
            conditioning="latent",
            latent_dim=3,
            actor_hidden=(32, 32),
            critic_hidden=(16, 16),
        )
    )
    with pytest.raises(CheckpointError, match="actor_hidden"):
        warm_start(wider, source.state_dict(), vars(source.spec), "nominal.pt")
    conditioned = ConditionedSAC(_spec("oracle"))
    target = ConditionedSAC(_spec("latent"))
    with pytest.raises(CheckpointError, match="unconditioned"):
        warm_start(target, conditioned.state_dict(), vars(conditioned.spec), "oracle.pt")


def _random_batch(seed: int) -> tuple[TransitionBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = TransitionBatch(
        obs=torch.randn(2, 64, OBS, generator=g),
        action=torch.rand(2, 64, ACT, generator=g) * 2 - 1,
        reward=torch.randn(2, 64, generator=g),
        next_obs=torch.randn(2, 64, OBS, generator=g),
    )
    return batch, torch.randn(2, 5, generator=g)


def _drift_from_source(source: ConditionedSAC, anchor_weight: float) -> float:
    """Mean squared distance of the deterministic actions from the source's after 40 updates
    on random data (whose critic pulls the actor somewhere else)."""
    torch.manual_seed(5)
    agent = ConditionedSAC(_spec("oracle", actor_lr=3e-3))
    warm_start(agent, source.state_dict(), vars(source.spec), "source")
    anchor = copy.deepcopy(agent.actor).requires_grad_(False)
    batch, oracle = _random_batch(0)
    for _ in range(40):
        agent.update(batch, task_condition=oracle, anchor=anchor, anchor_weight=anchor_weight)
    obs = batch.flatten().obs
    x = torch.cat([obs, oracle.repeat_interleave(64, 0)], -1)
    with torch.no_grad():
        return float((agent.actor(x) - anchor(x)).pow(2).sum(-1).mean())


def test_anchor_keeps_the_fine_tuned_actor_near_the_source(source):
    free = _drift_from_source(source, 0.0)
    held = _drift_from_source(source, 100.0)
    assert free > 1e-3  # the critic does move the actor without the anchor
    assert held < 0.1 * free, (held, free)


def test_anchor_loss_is_zero_at_the_anchor_and_reported(source):
    agent = ConditionedSAC(_spec("oracle"))
    warm_start(agent, source.state_dict(), vars(source.spec), "source")
    anchor = copy.deepcopy(agent.actor).requires_grad_(False)
    batch, oracle = _random_batch(1)
    first = agent.update(batch, task_condition=oracle, anchor=anchor, anchor_weight=1.0)
    assert first["anchor_loss"] == 0.0  # the actor starts as the anchor
    second = agent.update(batch, task_condition=oracle, anchor=anchor, anchor_weight=1.0)
    assert second["anchor_loss"] > 0.0
