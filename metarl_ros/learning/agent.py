"""Soft actor-critic conditioned on a task representation.

One implementation serves every method of the evaluation protocol; only the conditioning
differs:

* ``latent`` -- PEARL: ``z ~ q(z | context)`` from
  :class:`~metarl_ros.learning.encoder.ContextEncoder`,
  trained by the critic's Bellman loss plus ``kl_weight * KL(q(z|c) || N(0, I))``; the actor
  sees ``z`` detached (Rakelly et al., 2019, Sec. 4).
* ``oracle`` -- the true task parameters (:meth:`TaskParams.oracle_vector`), an upper bound.
* ``none`` -- no task information: the *robust* baseline when trained on the task
  distribution, the *nominal* baseline when trained on the intact robot only.

SAC details: tanh-Gaussian actor, twin Q critics (one vectorized ensemble) with Polyak-averaged
targets, clipped double-Q targets, automatic entropy tuning towards ``-act_dim``. Episodes are
only ever truncated (never terminated), so targets always bootstrap.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from metarl_ros.core.schema import ANY_VALUE, drop_retired
from metarl_ros.learning.encoder import ContextEncoder, TrailingContexts, kl_to_standard_normal
from metarl_ros.learning.model_actor import ModelFeedForwardActor
from metarl_ros.learning.networks import TanhGaussianActor, TwinCritic
from metarl_ros.learning.transitions import TransitionBatch

Conditioning = Literal["latent", "oracle", "none"]

RETIRED_SPEC_FIELDS: dict[str, Any] = {
    "encoder_input": "raw",
    "reconstruction_weight": 0.0,
    "decoder_hidden": ANY_VALUE,
    "task_inference_weight": 0.0,
}
"""Options removed after models were saved with them, each with the value that made it do
nothing (what the agent does now): model files that hold them at that value still load."""


@dataclass(frozen=True)
class AgentSpec:
    """Architecture and optimization settings of a :class:`ConditionedSAC`."""

    obs_dim: int
    act_dim: int
    conditioning: Conditioning = "latent"
    latent_dim: int = 8
    oracle_dim: int = 0
    encoder_hidden: tuple[int, ...] = (128, 128)
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
    actor_view: Literal["full", "reference"] = "full"
    """``reference``: the actor sees the observation as if the robot were on its reference
    (:func:`metarl_ros.control.law.reference_view_matrix`): pure feed-forward, so it cannot
    stiffen the loop; the critics always see the full observation."""
    actor_head: Literal["mlp", "model"] = "mlp"
    """``model``: the condition is mapped to the fault's physical parameters, fed forward
    through the nominal model's features (:class:`~metarl_ros.learning.model_actor.
    ModelFeedForwardActor`; needs an env with ``observation.model_features``)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentSpec:
        """The spec a model file stores (``dataclasses.asdict``, tuples possibly as lists);
        raises ``ValueError`` naming the field for a removed option set to anything but the
        value that made it do nothing, ``TypeError`` for unknown or missing fields."""
        values = drop_retired(data, RETIRED_SPEC_FIELDS)
        tuples = {f.name for f in fields(cls) if f.type.startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})

    @property
    def cond_dim(self) -> int:
        return {"latent": self.latent_dim, "oracle": self.oracle_dim, "none": 0}[self.conditioning]

    @property
    def transition_dim(self) -> int:
        return 2 * self.obs_dim + self.act_dim + 1


class ConditionedSAC(nn.Module):
    """SAC whose actor and critics take ``[obs, condition]``.

    Shapes: obs (B, obs_dim), condition (B, cond_dim), action (B, act_dim). ``obs_view``
    (obs_dim, obs_dim) is required with ``spec.actor_view == "reference"`` (a placeholder is
    fine when a state dict is loaded next) and refused otherwise.
    """

    def __init__(self, spec: AgentSpec, obs_view: torch.Tensor | None = None) -> None:
        super().__init__()
        if (spec.actor_view == "reference") != (obs_view is not None):
            raise ValueError(f"actor_view {spec.actor_view!r}: obs_view must be given exactly "
                             "when actor_view is 'reference'")
        self.spec = spec
        in_dim = spec.obs_dim + spec.cond_dim
        self.encoder = (
            ContextEncoder(spec.transition_dim, spec.latent_dim, spec.encoder_hidden)
            if spec.conditioning == "latent"
            else None
        )
        if spec.actor_head == "model":
            self.actor: TanhGaussianActor = ModelFeedForwardActor(
                in_dim, spec.actor_hidden, spec.act_dim, obs_view, spec.obs_dim)
        else:
            self.actor = TanhGaussianActor(in_dim, spec.actor_hidden, spec.act_dim, obs_view)
        if obs_view is not None:
            # a feed-forward residual cannot correct its own initial output from the error, so
            # it starts at zero: exactly the controller it is added to
            with torch.no_grad():
                self.actor.head.weight[: spec.act_dim].zero_()
                self.actor.head.bias[: spec.act_dim].zero_()
        self.critic = TwinCritic(in_dim + spec.act_dim, spec.critic_hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(float(spec.init_alpha)).log())
        self.target_entropy = -float(spec.act_dim)
        critic_params = list(self.critic.parameters())
        if self.encoder is not None:
            self.encoder_optimizer = torch.optim.Adam(
                list(self.encoder.parameters()), spec.encoder_lr
            )
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

    def actor_observation(self, obs: np.ndarray) -> np.ndarray:
        """What the actor sees of ``obs`` (..., obs_dim), float32: the observation itself, or
        its reference view (``spec.actor_view``). Anything that acts for the actor (the MAML
        action correction) must see the same, or it would add back the feedback the view
        removes."""
        obs = np.asarray(obs, dtype=np.float32)
        view = self.actor.obs_view
        if view is None:
            return obs
        return (obs @ view.numpy().T).astype(np.float32)

    # ------------------------------------------------------------------ learning

    def _parameter_loss(self, x: torch.Tensor, theta_true: torch.Tensor) -> torch.Tensor:
        """``mean_B ||(theta(x) - theta_true) / scale||^2`` of a model-structured actor."""
        actor = self.actor
        assert isinstance(actor, ModelFeedForwardActor)
        error = (actor.physical_parameters(x) - theta_true) / actor.parameter_scale
        return error.pow(2).sum(-1).mean()

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
        anchor: TanhGaussianActor | None = None,
        anchor_weight: float = 0.0,
        smoothness_weight: float = 0.0,
        teacher_weight: float = 0.0,
        parameter_weight: float = 0.0,
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
                ``oracle`` conditioning.
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
            teacher_weight: with ``> 0`` (``batch.teacher`` required) the actor loss gains
                ``teacher_weight * mean_B ||tanh(mean(x)) - teacher||^2``, imitation of the
                privileged label (:mod:`metarl_ros.sim.teacher`). For ``latent`` conditioning
                the same term, with the sampled ``z`` *not* detached, joins the encoder's loss:
                the posterior is trained to carry what the label needs (RMA's regression of the
                extrinsics, on PEARL's probabilistic encoder) besides the Bellman error.
            parameter_weight: with ``> 0`` (a model-structured actor, ``spec.actor_head ==
                "model"``, and ``batch.teacher`` holding the true fault parameters after the
                label) the actor loss gains ``parameter_weight * mean_B ||(theta(c) -
                theta_true) / scale||^2``: the estimate of the robot is regressed on the robot
                (RMA's extrinsics, in physical units); for ``latent`` conditioning through
                ``z`` into the encoder too.
        """
        spec = self.spec
        num_tasks, per_task = batch.reward.shape
        taught = teacher_weight > 0.0
        identified = parameter_weight > 0.0
        if (taught or identified) and batch.teacher is None:
            raise ValueError("teacher_weight > 0 or parameter_weight > 0 needs the batch's "
                             "teacher labels")
        if identified and not isinstance(self.actor, ModelFeedForwardActor):
            raise ValueError("parameter_weight > 0 needs agent.actor_head: model")
        kl = torch.zeros(())
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
        label = theta_true = None
        if flat.teacher is not None:
            label, theta_true = flat.teacher[:, :spec.act_dim], flat.teacher[:, spec.act_dim:]
            if identified and theta_true.shape[-1] != self.actor.parameter_scale.shape[0]:
                raise ValueError(f"parameter_weight > 0: the batch's teacher rows hold "
                                 f"{theta_true.shape[-1]} parameters, the actor estimates "
                                 f"{self.actor.parameter_scale.shape[0]}")
        x = torch.cat([flat.obs, cond], dim=-1)
        next_x = torch.cat([flat.next_obs, cond.detach() if next_cond is None else next_cond], -1)
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(next_x)
            next_q = self.critic_target(next_x, next_action).min(0).values
            target = flat.reward + spec.gamma * (next_q - alpha * next_log_prob)
        q = self.critic(x, flat.action)  # (2, TB)
        critic_loss = (q - target).pow(2).mean(-1).sum()
        privileged_loss = torch.zeros(())  # the encoder's share of the teacher's terms
        if self.encoder is not None:
            # through z into the encoder; the actor's gradients of this pass are discarded
            if taught:
                privileged_loss = teacher_weight * (self.actor(x) - label).pow(2).sum(-1).mean()
            if identified:
                privileged_loss = privileged_loss + parameter_weight * self._parameter_loss(
                    x, theta_true)
        self.critic_optimizer.zero_grad(set_to_none=True)
        if self.encoder is not None:
            self.encoder_optimizer.zero_grad(set_to_none=True)
        (critic_loss + spec.kl_weight * kl + privileged_loss).backward()
        self.critic_optimizer.step()
        if self.encoder is not None:
            self.encoder_optimizer.step()

        x_actor = x.detach()
        self.critic.requires_grad_(False)
        action, log_prob = self.actor.sample(x_actor)
        q_pi = self.critic(x_actor, action).min(0).values
        actor_loss = (alpha * log_prob - q_pi).mean()
        anchored = anchor is not None and anchor_weight > 0.0
        # the deterministic actions, once for every term that needs them
        mean_action = (self.actor(x_actor) if anchored or smoothness_weight > 0.0 or taught
                       else None)
        teacher_loss = torch.zeros(())
        if taught:
            teacher_loss = (mean_action - label).pow(2).sum(-1).mean()
            actor_loss = actor_loss + teacher_weight * teacher_loss
        parameter_loss = torch.zeros(())
        if identified:
            parameter_loss = self._parameter_loss(x_actor, theta_true)
            actor_loss = actor_loss + parameter_weight * parameter_loss
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
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.critic.requires_grad_(True)

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
            "teacher_loss": teacher_loss.item(),
            "parameter_loss": parameter_loss.item(),
            "kl": kl.item(),
            "alpha": alpha.item(),
            "q_mean": q.mean().item(),
            "entropy": -log_prob.mean().item(),
        }
