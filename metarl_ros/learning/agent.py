"""Soft actor-critic conditioned on a task representation.

One implementation serves every method of the evaluation protocol; only the conditioning
differs:

* ``latent`` -- PEARL: ``z ~ q(z | context)`` from
  :class:`~metarl_ros.learning.encoder.ContextEncoder`,
  trained by the critic's Bellman loss plus ``kl_weight * KL(q(z|c) || N(0, I))``; the actor
  sees ``z`` detached (Rakelly et al., 2019, Sec. 4). Optionally
  (``reconstruction_weight > 0``) the encoder also learns from a decoder that predicts each
  RL transition's change of state from ``(s, a, z)``, ``z`` inferred from the transitions
  before it (a variBAD-style model loss, Zintgraf et al., 2020): a self-supervised signal
  that needs no task labels (``metarl retrain``'s offline objective does not use it). Or
  (``task_inference_weight > 0``) a linear head regresses the true task vector from the
  posterior mean: task inference supervised by the simulator's task parameters in training
  only (Humplik et al., 2019, "Meta reinforcement learning as task inference"); the deployed
  policy still sees nothing but its context.
* ``oracle`` -- the true task parameters (:meth:`TaskParams.oracle_vector`), an upper bound.
* ``none`` -- no task information: the *robust* baseline when trained on the task
  distribution, the *nominal* baseline when trained on the intact robot only.

SAC details: tanh-Gaussian actor, twin Q critics (one vectorized ensemble) with Polyak-averaged
targets, clipped double-Q targets, automatic entropy tuning towards ``-act_dim``. Episodes are
only ever truncated (never terminated), so targets always bootstrap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from metarl_ros.learning.encoder import (
    ContextEncoder,
    TrailingContexts,
    kl_to_standard_normal,
    make_transition,
)
from metarl_ros.learning.networks import TanhGaussianActor, TwinCritic, mlp
from metarl_ros.learning.replay import TransitionBatch

Conditioning = Literal["latent", "oracle", "none"]
EncoderInput = Literal["raw", "normalized_delta"]


@dataclass(frozen=True)
class AgentSpec:
    """Architecture and optimization settings of a :class:`ConditionedSAC`."""

    obs_dim: int
    act_dim: int
    conditioning: Conditioning = "latent"
    latent_dim: int = 8
    oracle_dim: int = 0
    encoder_hidden: tuple[int, ...] = (128, 128)
    encoder_input: EncoderInput = "raw"
    actor_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)
    gamma: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    encoder_lr: float = 3e-4
    alpha_lr: float = 3e-4
    init_alpha: float = 0.1
    kl_weight: float = 0.1
    reconstruction_weight: float = 0.0
    decoder_hidden: tuple[int, ...] = (128, 128)
    task_inference_weight: float = 0.0

    @property
    def cond_dim(self) -> int:
        return {"latent": self.latent_dim, "oracle": self.oracle_dim, "none": 0}[self.conditioning]

    @property
    def transition_dim(self) -> int:
        return 2 * self.obs_dim + self.act_dim + 1


class ConditionedSAC(nn.Module):
    """SAC whose actor and critics take ``[obs, condition]``.

    Shapes: obs (B, obs_dim), condition (B, cond_dim), action (B, act_dim).
    """

    def __init__(self, spec: AgentSpec) -> None:
        super().__init__()
        self.spec = spec
        in_dim = spec.obs_dim + spec.cond_dim
        self.encoder = (
            ContextEncoder(
                spec.transition_dim,
                spec.latent_dim,
                spec.encoder_hidden,
                input_features=spec.encoder_input,
                obs_dim=spec.obs_dim,
            )
            if spec.conditioning == "latent"
            else None
        )
        self.decoder = None
        if spec.reconstruction_weight > 0:
            if self.encoder is None or spec.encoder_input != "normalized_delta":
                raise ValueError(
                    "reconstruction_weight > 0 needs latent conditioning and encoder_input "
                    "'normalized_delta' (the decoder predicts the standardized change of state)"
                )
            self.decoder = mlp(spec.obs_dim + spec.act_dim + spec.latent_dim,
                               spec.decoder_hidden, spec.obs_dim)
        self.task_head = None
        if spec.task_inference_weight > 0:
            if self.encoder is None or spec.oracle_dim <= 0:
                raise ValueError(
                    "task_inference_weight > 0 needs latent conditioning and oracle_dim > 0 "
                    "(the size of the task vector the head regresses)"
                )
            self.task_head = nn.Linear(spec.latent_dim, spec.oracle_dim)
        self.actor = TanhGaussianActor(in_dim, spec.actor_hidden, spec.act_dim)
        self.critic = TwinCritic(in_dim + spec.act_dim, spec.critic_hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(float(spec.init_alpha)).log())
        self.target_entropy = -float(spec.act_dim)
        critic_params = list(self.critic.parameters())
        if self.encoder is not None:
            encoder_params = list(self.encoder.parameters())
            for head in (self.decoder, self.task_head):
                if head is not None:
                    encoder_params += list(head.parameters())
            self.encoder_optimizer = torch.optim.Adam(encoder_params, spec.encoder_lr)
        self.critic_optimizer = torch.optim.Adam(critic_params, spec.critic_lr)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), spec.actor_lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], spec.alpha_lr)

    # ------------------------------------------------------------------ acting

    @torch.no_grad()
    def act(self, obs: torch.Tensor, condition: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """Actions (B, act_dim) in [-1, 1]."""
        x = torch.cat([obs, condition], dim=-1)
        if deterministic:
            return self.actor(x)
        return self.actor.sample(x)[0]

    # ------------------------------------------------------------------ learning

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        result = {
            "critic": self.critic_optimizer,
            "actor": self.actor_optimizer,
            "alpha": self.alpha_optimizer,
        }
        if self.encoder is not None:
            result["encoder"] = self.encoder_optimizer
        return result

    def update(
        self,
        batch: TransitionBatch,
        context: torch.Tensor | TrailingContexts | None = None,
        context_mask: torch.Tensor | None = None,
        task_condition: torch.Tensor | None = None,
        train_actor: bool = True,
        anchor: TanhGaussianActor | None = None,
        anchor_weight: float = 0.0,
        smoothness_weight: float = 0.0,
    ) -> dict[str, float]:
        """One gradient step on a meta-batch.

        Args:
            batch: RL transitions with leading dims (T, B).
            context: for ``latent`` conditioning, either encoder input (T, N,
                transition_dim): one posterior per task for its whole row of the batch
                (PEARL's), or :class:`TrailingContexts` whose RL transitions are ``batch``'s
                (T, B) in segment order: one posterior per transition, the deployed one,
                and the next state's for the Bellman target.
            context_mask: (T, N), 1 for valid context entries (variable context sizes).
            task_condition: (T, oracle_dim) or, one per transition, (T, B, oracle_dim), for
                ``oracle`` conditioning; for ``latent`` conditioning with
                ``task_inference_weight > 0``, the true task vector of each RL transition
                (T, B, oracle_dim), the task head's target (trailing contexts only).
            train_actor: False updates only the critics (and the encoder): the critic warm-up
                after a warm start, whose copied critic is not yet right for the new tasks.
            anchor: a frozen actor with this agent's input layout (the warm-start policy).
                With ``anchor_weight > 0`` the actor loss gains
                ``anchor_weight * mean_B ||tanh(mean(x)) - anchor(x)||^2``: a trust region
                that keeps the deterministic action near the anchor's wherever the critic's
                action gradient is weaker than the pull (see ``TrainConfig.anchor_weight``).
            smoothness_weight: with ``> 0`` the actor loss gains
                ``smoothness_weight * mean_B ||tanh(mean(s, c)) - tanh(mean(s', c))||^2``
                over the batch's consecutive states: the temporal term of CAPS (Mysore et
                al., 2021), against actions that flip from one control step to the next
                (see ``TrainConfig.smoothness_weight``).
        """
        spec = self.spec
        num_tasks, per_task = batch.reward.shape
        kl = torch.zeros(())
        task_loss = torch.zeros(())
        next_cond = None
        if spec.conditioning == "latent":
            assert self.encoder is not None and context is not None
            if isinstance(context, TrailingContexts):
                (mu, var), (next_mu, next_var) = context.posteriors(self.encoder)
                noise = torch.randn_like(mu)  # one draw for s and s': the same belief sample
                z = mu + var.sqrt() * noise  # (T, B, L)
                next_cond = (next_mu + next_var.sqrt() * noise).detach().flatten(0, 1)
            else:
                mu, var = self.encoder.posterior(context, context_mask)
                z = mu + var.sqrt() * torch.randn_like(mu)  # (T, L)
            kl = kl_to_standard_normal(mu, var).mean()
            if self.task_head is not None:
                if task_condition is None or not isinstance(context, TrailingContexts):
                    raise ValueError("task_inference_weight > 0 needs trailing contexts and "
                                     "each RL transition's task vector (task_condition)")
                task_loss = (self.task_head(mu) - task_condition).pow(2).mean()
            task_cond = z
        elif spec.conditioning == "oracle":
            assert task_condition is not None
            task_cond = task_condition
        else:
            task_cond = torch.zeros(num_tasks, 0)
        if task_cond.dim() == 3:  # one condition per transition
            cond = task_cond.flatten(0, 1)
        else:
            cond = task_cond.unsqueeze(1).expand(-1, per_task, -1).flatten(0, 1)
        flat = batch.flatten()
        x = torch.cat([flat.obs, cond], dim=-1)
        next_x = torch.cat([flat.next_obs, cond.detach() if next_cond is None else next_cond], -1)
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(next_x)
            next_q = self.critic_target(next_x, next_action).min(0).values
            target = flat.reward + spec.gamma * (next_q - alpha * next_log_prob)
        q = self.critic(x, flat.action)  # (2, TB)
        critic_loss = (q - target).pow(2).mean(-1).sum()
        reconstruction_loss = self._reconstruction_loss(flat, cond)
        self.critic_optimizer.zero_grad(set_to_none=True)
        if self.encoder is not None:
            self.encoder_optimizer.zero_grad(set_to_none=True)
        (
            critic_loss
            + spec.kl_weight * kl
            + spec.reconstruction_weight * reconstruction_loss
            + spec.task_inference_weight * task_loss
        ).backward()
        self.critic_optimizer.step()
        if self.encoder is not None:
            self.encoder_optimizer.step()

        x_actor = x.detach()
        self.critic.requires_grad_(False)
        action, log_prob = self.actor.sample(x_actor)
        q_pi = self.critic(x_actor, action).min(0).values
        actor_loss = (alpha * log_prob - q_pi).mean()
        anchored = anchor is not None and anchor_weight > 0.0
        # the deterministic actions, once for both terms that need them
        mean_action = self.actor(x_actor) if anchored or smoothness_weight > 0.0 else None
        anchor_loss = torch.zeros(())
        if anchored:
            with torch.no_grad():
                reference = anchor(x_actor)
            anchor_loss = (mean_action - reference).pow(2).sum(-1).mean()
            actor_loss = actor_loss + anchor_weight * anchor_loss
        smoothness_loss = torch.zeros(())
        if smoothness_weight > 0.0:
            # the next state under the same condition: smooth in the state, free to follow a
            # change of belief; no gradient to the encoder (the condition is detached)
            next_same = torch.cat([flat.next_obs, cond.detach()], dim=-1)
            smoothness_loss = (mean_action - self.actor(next_same)).pow(2).sum(-1).mean()
            actor_loss = actor_loss + smoothness_weight * smoothness_loss
        if train_actor:
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_optimizer.step()
        self.critic.requires_grad_(True)

        if train_actor:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
            self.alpha_optimizer.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_optimizer.step()

        with torch.no_grad():
            online = list(self.critic.parameters())
            target_params = list(self.critic_target.parameters())
            torch._foreach_lerp_(target_params, online, spec.tau)

        return {
            "critic_loss": critic_loss.item(),
            "actor_loss": actor_loss.item(),
            "anchor_loss": anchor_loss.item(),
            "smoothness_loss": smoothness_loss.item(),
            "kl": kl.item(),
            "reconstruction_loss": reconstruction_loss.item(),
            "task_inference_loss": task_loss.item(),
            "alpha": alpha.item(),
            "q_mean": q.mean().item(),
            "entropy": -log_prob.mean().item(),
        }

    def _reconstruction_loss(self, flat: TransitionBatch, cond: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the decoder's standardized change of state (0 without one).

        flat: RL transitions (N, ...); cond: the z each was acted on with (N, latent_dim),
        carrying the encoder's gradient.
        """
        if self.decoder is None:
            return torch.zeros(())
        assert self.encoder is not None
        with torch.no_grad():
            features = self.encoder.features(
                make_transition(flat.obs, flat.action, flat.reward, flat.next_obs)
            )
            target = features[:, -self.spec.obs_dim :]
        predicted = self.decoder(torch.cat([flat.obs, flat.action, cond], dim=-1))
        return (predicted - target).pow(2).mean()
