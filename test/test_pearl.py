"""Tests for the PEARL learning core: the Gaussian-product posterior, streaming windows, the
tanh-Gaussian actor, the ensemble critic and one ConditionedSAC update.

Everything runs on tiny networks in a fraction of a second.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TanhTransform, TransformedDistribution, kl_divergence
from torch.nn import functional as F

from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.encoder import (
    BatchedWindows,
    ContextEncoder,
    StreamingPosterior,
    TrailingContexts,
    kl_to_standard_normal,
    make_transition,
    product_of_gaussians,
    trailing_windows,
    windowed_posterior,
)
from metarl_ros.learning.networks import EnsembleMLP, TanhGaussianActor, TwinCritic
from metarl_ros.learning.transitions import TransitionBatch

torch.set_num_threads(1)


def random_factors(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0
    var = torch.rand(*shape, generator=g, dtype=torch.float64) * 3.0 + 0.05
    return mu, var


def fold_pairwise(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of Gaussians over dim -2 by repeatedly multiplying two densities:
    N(m1, v1) N(m2, v2) ∝ N((m1 v2 + m2 v1) / (v1 + v2), v1 v2 / (v1 + v2))."""
    m, v = mu[..., 0, :], var[..., 0, :]
    for n in range(1, mu.shape[-2]):
        m2, v2 = mu[..., n, :], var[..., n, :]
        m, v = (m * v2 + m2 * v) / (v + v2), v * v2 / (v + v2)
    return m, v


# ------------------------------------------------------------------------------------------
# product of Gaussians and KL
# ------------------------------------------------------------------------------------------


def test_product_of_gaussians_closed_form():
    mu, var = random_factors(3, 6, 4)
    mean, post_var = product_of_gaussians(mu, var)
    assert mean.shape == post_var.shape == (3, 4)
    precision = (1.0 / var).sum(-2)
    torch.testing.assert_close(post_var, 1.0 / precision, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, ((mu / var).sum(-2)) / precision, rtol=1e-12, atol=1e-12)
    # independent derivation: fold two densities at a time
    m_ref, v_ref = fold_pairwise(mu, var)
    torch.testing.assert_close(mean, m_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post_var, v_ref, rtol=1e-10, atol=1e-10)
    # the product of the factor densities is proportional to the posterior density:
    # sum_n log N(x; mu_n, var_n) - log N(x; mean, var) must not depend on x
    xs = torch.randn(5, 3, 4, dtype=torch.float64) * 3.0
    factors = Normal(mu, var.sqrt())
    posterior = Normal(mean, post_var.sqrt())
    diff = torch.stack([
        factors.log_prob(x.unsqueeze(-2)).sum(-2) - posterior.log_prob(x) for x in xs
    ])
    torch.testing.assert_close(diff, diff[:1].expand_as(diff), rtol=0, atol=1e-9)


def test_product_of_gaussians_with_mask():
    mu, var = random_factors(4, 5, 3, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1],
                         [1, 0, 1, 0, 1],
                         [0, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0]], dtype=torch.float64)
    mean, post_var = product_of_gaussians(mu, var, mask)
    # a full mask is the plain product
    m_all, v_all = product_of_gaussians(mu[0], var[0])
    torch.testing.assert_close(mean[0], m_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post_var[0], v_all, rtol=1e-12, atol=1e-12)
    # a partial mask is the product over the kept factors only (no prior)
    keep = mask[1].bool()
    m_ref, v_ref = fold_pairwise(mu[1, keep], var[1, keep])
    torch.testing.assert_close(mean[1], m_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post_var[1], v_ref, rtol=1e-10, atol=1e-10)
    # one factor: the posterior is that factor
    torch.testing.assert_close(mean[2], mu[2, 4], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post_var[2], var[2, 4], rtol=1e-12, atol=1e-12)
    # nothing kept: the standard normal prior
    torch.testing.assert_close(mean[3], torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(post_var[3], torch.ones(3, dtype=torch.float64), rtol=0, atol=0)


def test_masked_out_factor_has_no_influence():
    mu, var = random_factors(2, 6, 3, seed=2)
    mask = torch.ones(2, 6, dtype=torch.float64)
    mask[:, 2] = 0.0
    before = product_of_gaussians(mu, var, mask)
    # a wild value in the masked slot, including a tiny variance that would dominate
    mu2, var2 = mu.clone(), var.clone()
    mu2[:, 2], var2[:, 2] = 1e6, 1e-8
    after = product_of_gaussians(mu2, var2, mask)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and an all-masked row ignores everything, even the wild values
    empty = torch.zeros(2, 6, dtype=torch.float64)
    m, v = product_of_gaussians(mu2, var2, empty)
    assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.ones_like(v))


def test_kl_to_standard_normal():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(7, 5, generator=g, dtype=torch.float64)
    var = torch.rand(7, 5, generator=g, dtype=torch.float64) * 4.0 + 0.01
    kl = kl_to_standard_normal(mu, var)
    assert kl.shape == (7,)
    # analytic, written out per dimension: log(1/sigma) + (sigma^2 + mu^2) / 2 - 1/2
    expected = torch.zeros(7, dtype=torch.float64)
    for i in range(7):
        for d in range(5):
            s2, m = float(var[i, d]), float(mu[i, d])
            expected[i] += -0.5 * math.log(s2) + 0.5 * (s2 + m * m) - 0.5
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    reference = kl_divergence(Normal(mu, var.sqrt()), Normal(torch.zeros_like(mu), 1.0)).sum(-1)
    torch.testing.assert_close(kl, reference, rtol=1e-10, atol=1e-10)
    # zero exactly at the prior, positive elsewhere
    assert torch.equal(kl_to_standard_normal(torch.zeros(3), torch.ones(3)), torch.tensor(0.0))
    assert (kl > 0).all()


# ------------------------------------------------------------------------------------------
# streaming posterior and batched windows
# ------------------------------------------------------------------------------------------


def tiny_encoder(transition_dim: int = 6, latent: int = 3) -> ContextEncoder:
    torch.manual_seed(0)
    return ContextEncoder(transition_dim, latent, hidden=[16])


def test_streaming_posterior_equals_batch_posterior_over_window():
    encoder = tiny_encoder()
    window = 5
    stream = StreamingPosterior(encoder, window)
    mu0, var0 = stream.posterior()
    assert torch.equal(mu0, torch.zeros(3)) and torch.equal(var0, torch.ones(3))
    transitions = torch.randn(13, 6)
    for n in range(1, len(transitions) + 1):
        stream.push(transitions[n - 1])
        assert len(stream) == min(n, window)
        mu, var = stream.posterior()
        with torch.no_grad():
            ref_mu, ref_var = encoder.posterior(transitions[max(0, n - window):n].unsqueeze(0))
        torch.testing.assert_close(mu, ref_mu[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, ref_var[0], rtol=1e-5, atol=1e-6)
    # after 13 pushes only the last 5 count: the oldest ones are gone
    with torch.no_grad():
        all_mu, _ = encoder.posterior(transitions.unsqueeze(0))
    assert not torch.allclose(stream.posterior()[0], all_mu[0], atol=1e-4)
    stream.reset()
    assert len(stream) == 0
    mu, var = stream.posterior()
    assert torch.equal(mu, torch.zeros(3)) and torch.equal(var, torch.ones(3))
    with pytest.raises(ValueError):
        StreamingPosterior(encoder, 0)


def test_batched_windows_match_streaming_posterior_with_wraparound():
    encoder = tiny_encoder()
    streams, window = 3, 4
    batched = BatchedWindows(streams, window, latent_dim=3)
    singles = [StreamingPosterior(encoder, window) for _ in range(streams)]

    def check() -> None:
        mu, var = batched.posterior()
        for s, single in enumerate(singles):
            ref_mu, ref_var = single.posterior()
            torch.testing.assert_close(mu[s], ref_mu, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var[s], ref_var, rtol=1e-5, atol=1e-6)
        assert batched.fill().tolist() == [float(len(single)) for single in singles]

    check()  # all empty: the prior
    for step in range(11):  # 11 > 2 * window: the ring buffer wraps around twice
        if step == 6:  # stream 1 is reset mid-way (a new episode) and refills
            batched.reset(torch.tensor([1]))
            singles[1].reset()
            check()
        transitions = torch.randn(streams, 6)
        with torch.no_grad():
            batched.push(*encoder.factors(transitions))
        for single, transition in zip(singles, transitions):
            single.push(transition)
        check()
    batched.reset()
    for single in singles:
        single.reset()
    check()


def test_windowed_posterior_equals_the_masked_product_of_each_window():
    mu, var = random_factors(2, 7, 3, seed=4)
    windows = (torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    windows[1, 2] = 0.0  # an empty window: the prior
    mean, variance = windowed_posterior(mu, var, windows)
    assert mean.shape == variance.shape == (2, 5, 3)
    for t in range(2):
        for m in range(5):
            ref_mu, ref_var = product_of_gaussians(mu[t], var[t], windows[t, m])
            torch.testing.assert_close(mean[t, m], ref_mu)
            torch.testing.assert_close(variance[t, m], ref_var)
    assert torch.equal(mean[1, 2], torch.zeros(3)) and torch.equal(variance[1, 2], torch.ones(3))


def test_trailing_contexts_are_the_posteriors_the_deployed_policy_acts_with():
    """A sequence that crosses an episode boundary: every RL transition's context is what a
    StreamingPosterior, reset at the boundary, held when the policy acted on it (before the
    transition is pushed), and its next state's is what it held right after."""
    encoder = tiny_encoder()
    window = 4
    episode_step = torch.tensor([7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6])  # reset at index 5
    transitions = torch.randn(len(episode_step), 6)
    windows, next_windows = trailing_windows(episode_step, window)
    assert windows.shape == next_windows.shape == (len(episode_step) - window, len(episode_step))
    contexts = TrailingContexts(transitions[None, None], windows[None, None],
                                next_windows[None, None])
    with torch.no_grad():
        (mu, var), (next_mu, next_var) = contexts.posteriors(encoder)
    assert mu.shape == next_mu.shape == (1, len(episode_step) - window, 3)

    stream = StreamingPosterior(encoder, window)
    for j, transition in enumerate(transitions):
        if episode_step[j] == 0:
            stream.reset()
        acted_with = stream.posterior()
        stream.push(transition)
        if j >= window:
            torch.testing.assert_close(mu[0, j - window], acted_with[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var[0, j - window], acted_with[1], rtol=1e-5, atol=1e-6)
            after = stream.posterior()
            torch.testing.assert_close(next_mu[0, j - window], after[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(next_var[0, j - window], after[1], rtol=1e-5, atol=1e-6)
    # right after the reset (index 5) the policy acted on the prior
    assert torch.equal(mu[0, 5 - window], torch.zeros(3))
    with pytest.raises(ValueError, match="no RL transition"):
        trailing_windows(episode_step[:window], window)


def test_make_transition_layout():
    obs, action, next_obs = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 3)
    reward = torch.randn(4)
    t = make_transition(obs, action, reward, next_obs)
    assert t.shape == (4, 9)
    torch.testing.assert_close(t, torch.cat([obs, action, reward[:, None], next_obs], -1))
    torch.testing.assert_close(make_transition(obs, action, reward[:, None], next_obs), t)


# ------------------------------------------------------------------------------------------
# actor and critic
# ------------------------------------------------------------------------------------------


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(4)
    actor = TanhGaussianActor(5, [16, 16], 3)
    x = torch.randn(64, 5) * 2.0
    torch.manual_seed(123)
    action, log_prob = actor.sample(x)
    # the same noise again: sample() draws exactly one randn_like(mean)
    mean, log_std = actor.distribution_params(x)
    torch.manual_seed(123)
    pre_tanh = mean + log_std.exp() * torch.randn_like(mean)
    torch.testing.assert_close(action, torch.tanh(pre_tanh))

    tanh = TanhTransform(cache_size=1)
    squashed = tanh(pre_tanh)  # cached, so log_prob inverts exactly (no atanh round-off)
    squashed_normal = TransformedDistribution(Normal(mean, log_std.exp()), [tanh])
    reference = squashed_normal.log_prob(squashed).sum(-1)
    torch.testing.assert_close(log_prob, reference, rtol=0, atol=1e-4)

    # change of variables in float64: log N(u) - sum log(1 - tanh(u)^2)
    u, m, s = pre_tanh.double(), mean.double(), log_std.double().exp()
    analytic = (Normal(m, s).log_prob(u) - torch.log1p(-torch.tanh(u).pow(2))).sum(-1)
    moderate = u.abs().max(-1).values < 4.0  # where 1 - tanh^2 is still accurate in float64
    assert moderate.sum() > 10
    torch.testing.assert_close(log_prob.double()[moderate], analytic[moderate], rtol=0, atol=1e-4)


def test_tanh_gaussian_density_integrates_to_one():
    """1-D action: the density implied by sample()'s log-prob integrates to 1 over (-1, 1)."""
    torch.manual_seed(5)
    actor = TanhGaussianActor(2, [8], 1)
    x = torch.tensor([[0.7, -1.3]])
    with torch.no_grad():
        mean, log_std = actor.distribution_params(x)
    # sample() densities at many points: integral over actions of p(a) = E_u[1] with a = tanh(u);
    # check it as sum p(a_i) * da on a fine grid built from pre-tanh values
    u = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    log_p = (Normal(mean.double()[0, 0], log_std.double().exp()[0, 0]).log_prob(u)
             - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u)))
    a = torch.tanh(u)
    integral = torch.trapezoid(log_p.exp(), a)
    assert abs(float(integral) - 1.0) < 1e-3
    # and sample()'s value equals this density at its own sample
    torch.manual_seed(9)
    action, log_prob = actor.sample(x)
    u_s = torch.atanh(action.double().clamp(-1 + 1e-12, 1 - 1e-12))
    expected = (Normal(mean.double(), log_std.double().exp()).log_prob(u_s)
                - torch.log1p(-torch.tanh(u_s).pow(2))).sum(-1)
    torch.testing.assert_close(log_prob.double(), expected, rtol=0, atol=1e-3)


def test_actions_lie_in_unit_box():
    torch.manual_seed(6)
    actor = TanhGaussianActor(4, [16, 16], 3)
    with torch.no_grad():
        for layer in actor.head.parameters():
            layer.mul_(50.0)  # huge means and std: saturated tanh
        x = torch.randn(500, 4) * 10.0
        action, log_prob = actor.sample(x)
        deterministic = actor(x)
    for a in (action, deterministic):
        assert a.shape == (500, 3)
        assert torch.isfinite(a).all()
        assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.isfinite(log_prob).all()
    assert deterministic.abs().max() > 0.99  # the box is actually reached, not shrunk
    mean, log_std = actor.distribution_params(x)
    assert log_std.min() >= -5.0 and log_std.max() <= 2.0


def plain_member(ensemble: EnsembleMLP, member: int, x: torch.Tensor) -> torch.Tensor:
    for i, layer in enumerate(ensemble.layers):
        x = x @ layer.weight[member] + layer.bias[member, 0]
        if i < len(ensemble.layers) - 1:
            x = torch.relu(x)
    return x


def test_ensemble_members_match_plain_mlp_and_are_independent():
    torch.manual_seed(7)
    ensemble = EnsembleMLP(2, 5, [12, 8], 3)
    x = torch.randn(10, 5)
    out = ensemble(x)
    assert out.shape == (2, 10, 3)
    for member in range(2):
        torch.testing.assert_close(out[member], plain_member(ensemble, member, x))
    # per-member inputs (E, B, in) work as well
    xe = torch.randn(2, 10, 5)
    out_e = ensemble(xe)
    for member in range(2):
        torch.testing.assert_close(out_e[member], plain_member(ensemble, member, xe[member]))
    assert not torch.allclose(out[0], out[1])  # independently initialized

    out[0].sum().backward()
    for layer in ensemble.layers:
        assert layer.weight.grad[0].abs().sum() > 0
        assert torch.equal(layer.weight.grad[1], torch.zeros_like(layer.weight.grad[1]))
        assert torch.equal(layer.bias.grad[1], torch.zeros_like(layer.bias.grad[1]))


def test_twin_critic_members():
    torch.manual_seed(8)
    critic = TwinCritic(4 + 2, [16, 16])
    obs_cond, action = torch.randn(9, 4), torch.randn(9, 2)
    q = critic(obs_cond, action)
    assert q.shape == (2, 9)
    joint = torch.cat([obs_cond, action], -1)
    for member in range(2):
        torch.testing.assert_close(q[member], plain_member(critic.net, member, joint)[:, 0])
    q[1].pow(2).mean().backward()
    for layer in critic.net.layers:
        assert torch.equal(layer.weight.grad[0], torch.zeros_like(layer.weight.grad[0]))
        assert layer.weight.grad[1].abs().sum() > 0


# ------------------------------------------------------------------------------------------
# ConditionedSAC.update
# ------------------------------------------------------------------------------------------

OBS, ACT, LATENT, TASKS, PER_TASK, CONTEXT = 4, 2, 3, 3, 8, 5


def tiny_agent(tau: float = 0.3, kl_weight: float = 0.5) -> ConditionedSAC:
    torch.manual_seed(10)
    spec = AgentSpec(obs_dim=OBS, act_dim=ACT, conditioning="latent", latent_dim=LATENT,
                     encoder_hidden=(16,), actor_hidden=(16, 16), critic_hidden=(16, 16),
                     tau=tau, kl_weight=kl_weight, gamma=0.9)
    return ConditionedSAC(spec)


def synthetic_meta_batch(seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    batch = TransitionBatch(
        obs=torch.randn(TASKS, PER_TASK, OBS, generator=g),
        action=torch.rand(TASKS, PER_TASK, ACT, generator=g) * 2 - 1,
        reward=torch.randn(TASKS, PER_TASK, generator=g),
        next_obs=torch.randn(TASKS, PER_TASK, OBS, generator=g),
    )
    context = torch.randn(TASKS, CONTEXT, 2 * OBS + ACT + 1, generator=g)
    mask = torch.ones(TASKS, CONTEXT)
    mask[1, :2] = 0.0  # a partly filled window
    return batch, context, mask


def reference_critic_phase(agent: ConditionedSAC, batch, context, mask, seed: int):
    """Recompute the critic + KL loss of update() (same RNG draws) and its gradients."""
    spec = agent.spec
    torch.manual_seed(seed)
    mu, var = agent.encoder.posterior(context, mask)
    z = mu + var.sqrt() * torch.randn_like(mu)
    kl = kl_to_standard_normal(mu, var).mean()
    cond = z.unsqueeze(1).expand(-1, PER_TASK, -1).reshape(TASKS * PER_TASK, -1)
    flat = batch.flatten()
    x = torch.cat([flat.obs, cond], -1)
    next_x = torch.cat([flat.next_obs, cond.detach()], -1)
    alpha = agent.log_alpha.exp().detach()
    with torch.no_grad():
        next_action, next_log_prob = agent.actor.sample(next_x)
        next_q = agent.critic_target(next_x, next_action).min(0).values
        target = flat.reward + spec.gamma * (next_q - alpha * next_log_prob)
    critic_loss = (agent.critic(x, flat.action) - target).pow(2).mean(-1).sum()
    params = list(agent.encoder.parameters()) + list(agent.critic.parameters())
    grads = torch.autograd.grad(critic_loss + spec.kl_weight * kl, params)
    n = len(list(agent.encoder.parameters()))
    return critic_loss.item(), kl.item(), grads[:n], grads[n:]


def test_update_encoder_gets_critic_and_kl_gradients_only():
    agent = tiny_agent()
    batch, context, mask = synthetic_meta_batch()
    reference = copy.deepcopy(agent)
    ref_loss, ref_kl, ref_enc_grads, ref_critic_grads = reference_critic_phase(
        reference, batch, context, mask, seed=99)

    encoder_backward_calls = [0]
    first = next(agent.encoder.parameters())
    def count(grad: torch.Tensor) -> None:
        encoder_backward_calls[0] += 1

    first.register_hook(count)
    torch.manual_seed(99)
    stats = agent.update(batch, context, mask)

    assert stats["critic_loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert stats["kl"] == pytest.approx(ref_kl, rel=1e-6)
    assert stats["kl"] > 0
    # the encoder's gradient is exactly d(critic_loss + kl_weight * KL)/d(encoder): the actor
    # loss adds nothing (it sees z detached), and only one backward pass reaches the encoder
    assert encoder_backward_calls[0] == 1
    for p, g in zip(agent.encoder.parameters(), ref_enc_grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    # likewise the critic only holds its own loss's gradient (it is frozen for the actor loss)
    for p, g in zip(agent.critic.parameters(), ref_critic_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    # the actor was trained, the encoder and critic moved
    assert all(p.grad is not None for p in agent.actor.parameters())
    for mine, before in zip(agent.encoder.parameters(), reference.encoder.parameters()):
        assert not torch.equal(mine, before)


def test_update_critic_gradient_reaches_encoder_without_kl():
    """With kl_weight = 0 the encoder still learns: through the Bellman loss."""
    agent = tiny_agent(kl_weight=0.0)
    batch, context, mask = synthetic_meta_batch()
    agent.update(batch, context, mask)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.encoder.parameters())


def test_update_kl_gradient_reaches_encoder():
    """The KL term alone (critic contribution subtracted) pushes the posterior to the prior."""
    agent = tiny_agent(kl_weight=1.0)
    batch, context, mask = synthetic_meta_batch()
    with_kl = reference_critic_phase(copy.deepcopy(agent), batch, context, mask, seed=5)[2]
    agent_no_kl = copy.deepcopy(agent)
    agent_no_kl.spec = dataclasses.replace(agent.spec, kl_weight=0.0)
    without_kl = reference_critic_phase(agent_no_kl, batch, context, mask, seed=5)[2]
    mu, var = agent.encoder.posterior(context, mask)
    kl_grads = torch.autograd.grad(kl_to_standard_normal(mu, var).mean(),
                                   list(agent.encoder.parameters()))
    for a, b, k in zip(with_kl, without_kl, kl_grads):
        torch.testing.assert_close(a - b, k, rtol=1e-4, atol=1e-6)

    torch.manual_seed(5)
    agent.update(batch, context, mask)
    for p, g in zip(agent.encoder.parameters(), with_kl):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_update_polyak_target():
    tau = 0.3
    agent = tiny_agent(tau=tau)
    batch, context, mask = synthetic_meta_batch()
    # make target and online differ first, so the check is not trivially satisfied
    for _ in range(2):
        agent.update(batch, context, mask)
    target_before = [p.detach().clone() for p in agent.critic_target.parameters()]
    online_before = [p.detach().clone() for p in agent.critic.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(target_before, online_before))
    agent.update(batch, context, mask)
    online_after = [p.detach() for p in agent.critic.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online_before, online_after))
    for old, new, target in zip(target_before, online_after, agent.critic_target.parameters()):
        torch.testing.assert_close(target.detach(), old + tau * (new - old), rtol=0, atol=1e-6)
        assert not target.requires_grad
    # the target critic has no optimizer of its own and no gradients
    assert all(p.grad is None for p in agent.critic_target.parameters())


@pytest.mark.parametrize("conditioning", ["oracle", "none"])
def test_update_without_encoder(conditioning):
    torch.manual_seed(12)
    spec = AgentSpec(obs_dim=OBS, act_dim=ACT, conditioning=conditioning, oracle_dim=5,
                     actor_hidden=(16,), critic_hidden=(16,))
    agent = ConditionedSAC(spec)
    assert agent.encoder is None and "encoder" not in agent.optimizers()
    batch, _, _ = synthetic_meta_batch()
    condition = torch.randn(TASKS, 5) if conditioning == "oracle" else None
    stats = agent.update(batch, task_condition=condition)
    assert stats["kl"] == 0.0
    assert all(math.isfinite(v) for v in stats.values())
    obs = torch.randn(6, OBS)
    cond = torch.randn(6, spec.cond_dim)
    assert agent.act(obs, cond, deterministic=True).shape == (6, ACT)


def test_update_with_trailing_contexts_conditions_each_transition_on_its_own_posterior():
    """The critic loss of an update with TrailingContexts, recomputed by hand: each RL
    transition with z from its own window, its next state with the next window's (same
    noise), and the encoder's gradient is the critic's plus the KL's."""
    agent = tiny_agent()
    segments, window, per_segment = 2, 3, PER_TASK // 2
    length = window + per_segment
    g = torch.Generator().manual_seed(21)
    sequence = torch.randn(TASKS, segments, length, 2 * OBS + ACT + 1, generator=g)
    obs = sequence[..., :OBS]
    action = sequence[..., OBS:OBS + ACT].tanh()
    reward = sequence[..., OBS + ACT]
    next_obs = sequence[..., OBS + ACT + 1:]
    sequence = make_transition(obs, action, reward, next_obs)
    episode_step = torch.arange(length).expand(TASKS, segments, -1) + 2  # task 0 ...
    episode_step[0, 1] = torch.tensor([5, 6, 0, 1, 2, 3, 4])  # ... resets in segment 1
    windows, next_windows = trailing_windows(episode_step, window)
    contexts = TrailingContexts(sequence, windows, next_windows)
    tail = slice(window, None)
    batch = TransitionBatch(**{name: x[:, :, tail].flatten(1, 2) for name, x in (
        ("obs", obs), ("action", action), ("reward", reward), ("next_obs", next_obs))})

    reference = copy.deepcopy(agent)
    torch.manual_seed(7)
    (mu, var), (next_mu, next_var) = contexts.posteriors(reference.encoder)
    noise = torch.randn_like(mu)
    z = (mu + var.sqrt() * noise).flatten(0, 1)
    next_z = (next_mu + next_var.sqrt() * noise).flatten(0, 1)
    kl = kl_to_standard_normal(mu, var).mean()
    flat = batch.flatten()
    x = torch.cat([flat.obs, z], -1)
    next_x = torch.cat([flat.next_obs, next_z], -1)
    alpha = reference.log_alpha.exp().detach()
    with torch.no_grad():
        next_action, next_log_prob = reference.actor.sample(next_x)
        target = flat.reward + reference.spec.gamma * (
            reference.critic_target(next_x, next_action).min(0).values - alpha * next_log_prob)
    critic_loss = (reference.critic(x, flat.action) - target).pow(2).mean(-1).sum()
    grads = torch.autograd.grad(critic_loss + reference.spec.kl_weight * kl,
                                list(reference.encoder.parameters()))

    torch.manual_seed(7)
    stats = agent.update(batch, contexts)
    assert stats["critic_loss"] == pytest.approx(critic_loss.item(), rel=1e-6)
    assert stats["kl"] == pytest.approx(kl.item(), rel=1e-6)
    for p, g_ref in zip(agent.encoder.parameters(), grads):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-7)
    # task 0, segment 1 resets at position 2: its first RL transition (position 3, step 1)
    # acted on that one transition only, its next state on two; nothing from before the reset
    assert windows[0, 1, 0].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert next_windows[0, 1, 0].tolist() == [0, 0, 1, 1, 0, 0, 0]


def _step_to_step_change(agent: ConditionedSAC, batch: TransitionBatch, condition) -> float:
    flat = batch.flatten()
    cond = condition.repeat_interleave(PER_TASK, 0)
    with torch.no_grad():
        a = agent.actor(torch.cat([flat.obs, cond], -1))
        a_next = agent.actor(torch.cat([flat.next_obs, cond], -1))
    return float((a - a_next).pow(2).sum(-1).mean())


def test_smoothness_term_is_reported_and_smooths_consecutive_actions():
    batch, _, _ = synthetic_meta_batch()
    condition = torch.randn(TASKS, 5, generator=torch.Generator().manual_seed(3))
    changes, reported = {}, {}
    for weight in (0.0, 30.0):
        torch.manual_seed(12)
        spec = AgentSpec(obs_dim=OBS, act_dim=ACT, conditioning="oracle", oracle_dim=5,
                         actor_hidden=(16, 16), critic_hidden=(16, 16), actor_lr=3e-3)
        agent = ConditionedSAC(spec)
        before = _step_to_step_change(agent, batch, condition)
        stats = agent.update(batch, task_condition=condition, smoothness_weight=weight)
        # the reported term is the step-to-step change of the deterministic actions the
        # update started from
        reported[weight] = stats["smoothness_loss"]
        if weight:
            assert stats["smoothness_loss"] == pytest.approx(before, rel=1e-5)
        for _ in range(60):
            agent.update(batch, task_condition=condition, smoothness_weight=weight)
        changes[weight] = _step_to_step_change(agent, batch, condition)
    assert reported[0.0] == 0.0  # off: not computed
    assert changes[30.0] < 0.2 * changes[0.0], changes


def test_a_reference_view_actor_ignores_the_tracking_error():
    """actor_view 'reference': the actor's action does not change when only the measured
    state moves off the reference (it is pure feed-forward), while a full-view actor's does;
    the view travels with the weights through a model file's state dict."""
    import torch

    from metarl_ros.control.law import build_observation, reference_view_matrix
    from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
    from metarl_ros.sim.env_config import load_env_setup

    setup = load_env_setup()
    view = torch.as_tensor(reference_view_matrix(setup.law), dtype=torch.float32)
    spec = AgentSpec(obs_dim=setup.obs_dim, act_dim=7, conditioning="none",
                     actor_view="reference")
    torch.manual_seed(0)
    agent = ConditionedSAC(spec, view)
    none = torch.zeros(1, 0)
    obs0 = torch.from_numpy(np.zeros(setup.obs_dim, np.float32))[None]
    assert agent.act(obs0, none, deterministic=True).abs().max() == 0  # starts as a zero residual
    with torch.no_grad():  # a trained actor's head
        torch.nn.init.normal_(agent.actor.head.weight, std=0.3)
    full = ConditionedSAC(AgentSpec(obs_dim=setup.obs_dim, act_dim=7, conditioning="none"))
    rng = np.random.default_rng(1)
    ref = (rng.normal(size=7) * 0.3, rng.normal(size=7) * 0.3, rng.normal(size=7))
    prev = np.zeros(7, np.float32)
    on_ref = build_observation(setup.law, ref[0], ref[1], ref, prev)
    pushed = build_observation(setup.law, ref[0] + 0.05, ref[1] - 0.2, ref, prev)

    def act(a, obs):
        return a.act(torch.from_numpy(obs)[None], none, deterministic=True)[0].numpy()

    np.testing.assert_allclose(act(agent, on_ref), act(agent, pushed), atol=1e-6)
    assert np.abs(act(full, on_ref) - act(full, pushed)).max() > 1e-3
    np.testing.assert_allclose(agent.actor_observation(pushed), on_ref, atol=1e-5)
    loaded = ConditionedSAC(spec, torch.zeros_like(view))
    loaded.load_state_dict(agent.state_dict())
    np.testing.assert_allclose(act(loaded, pushed), act(agent, pushed), atol=0)
    with pytest.raises(ValueError, match="obs_view"):
        ConditionedSAC(spec)
