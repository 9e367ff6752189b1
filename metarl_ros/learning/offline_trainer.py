"""Offline fine-tuning for ``metarl retrain`` (:mod:`metarl_ros.learning.offline`): TD3+BC.

**Offline objective: TD3+BC on the SAC networks** (Fujimoto & Gu, 2021, "A Minimalist
Approach to Offline RL"), with PEARL's encoder trained as in meta-training:

* critic: clipped double-Q regression on ``r + gamma * min_j Q'_j(s', pi(s'), z)`` with the
  policy's *deterministic* action ``pi(s') = tanh(mean)`` -- the action the deployed policy
  takes -- and no entropy bonus (there is no exploration offline);
* encoder: through the critic loss plus ``kl_weight * KL(q(z|c) || N(0, I))``, contexts are
  windows of consecutive transitions of the same task, as in :mod:`~metarl_ros.learning.trainer`;
* actor: ``-lambda * Q_1(s, pi(s), z) + mean((pi(s) - a)^2)`` with
  ``lambda = bc_alpha / mean|Q_1|`` (the normalization makes ``bc_alpha`` scale-free). The
  default ``bc_alpha = 1`` is more conservative than the paper's 2.5: a few minutes of robot
  data are three orders of magnitude less than D4RL's datasets, and with that little data the
  Q term pulled the policy off the data in our runs. The first ``critic_warmup`` share of the
  updates trains only the critic and encoder, so the actor follows a critic fitted to the data.

Why: plain SAC on a fixed dataset maximizes Q where the data say nothing -- actions the
critic never saw get arbitrary values, the actor chases them and the policy collapses
(extrapolation error). A behaviour-cloning term keeps the policy on the data's support while Q
still ranks the actions the data contain. TD3+BC needs one extra hyper-parameter and one
extra loss term, costs nothing per update (CQL's logsumexp over sampled actions would need many
extra critic evaluations per state on a 2-core robot PC) and is the standard strong baseline on
D4RL's locomotion sets. Fine-tuning starts from the input model with reduced learning rates
(``lr_scale``), so little data moves the model only as far as the data support. The flip side:
offline data from one controller cannot show actions far from it -- the new model stays close
to what was recorded, which is the point.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from metarl_ros.core.schema import StrictModel
from metarl_ros.learning.agent import ConditionedSAC
from metarl_ros.learning.bag_tasks import TaskData
from metarl_ros.learning.checkpoint import CheckpointError
from metarl_ros.learning.encoder import kl_to_standard_normal, make_transition
from metarl_ros.learning.transitions import TransitionBatch

OBJECTIVE = "TD3+BC (deterministic clipped double-Q targets, BC-regularized actor)"


class RetrainError(CheckpointError):
    """``metarl retrain`` cannot run as asked (bad --out, unsupported model, ...)."""


class OfflineTrainingConfig(StrictModel):
    """Fine-tuning settings."""

    updates: PositiveInt = 2000
    batch_size: PositiveInt = Field(default=128, description="transitions per task per update")
    meta_batch_tasks: PositiveInt = 4
    bc_alpha: PositiveFloat = Field(
        default=1.0, description="TD3+BC's alpha: weight of the normalized Q term against BC "
        "(the paper's 2.5 is tuned for million-transition datasets; minutes of robot data "
        "need more weight on the data)")
    lr_scale: PositiveFloat = Field(
        default=0.3, description="the model's learning rates are multiplied by this")
    critic_warmup: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="fraction of the updates that train only the "
        "critic (and encoder) before the actor follows Q: a critic fitted to the data first")
    min_context: PositiveInt = Field(default=1, description="shortest context window sampled")
    finetune_encoder: bool = True
    seed: NonNegativeInt = 0
    torch_threads: PositiveInt = 1


class OfflineTrainer:
    """TD3+BC fine-tuning of a loaded :class:`ConditionedSAC` on per-task transition sets.

    Args:
        agent: the model's agent (modified in place).
        tasks: transitions per task.
        config: fine-tuning settings.
        window: context window (the model's contract ``window_size``).
    """

    def __init__(self, agent: ConditionedSAC, tasks: Sequence[TaskData],
                 config: OfflineTrainingConfig, window: int) -> None:
        if not tasks:
            raise RetrainError("no transitions to train on")
        self.agent = agent
        self.config = config
        self.window = max(1, window)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.data = [
            {k: torch.from_numpy(np.ascontiguousarray(getattr(t, k)))
             for k in ("obs", "action", "reward", "next_obs")} for t in tasks]
        self.sizes = np.asarray([len(t) for t in tasks])
        spec = agent.spec
        scale = config.lr_scale
        self.critic_optimizer = torch.optim.Adam(agent.critic.parameters(), spec.critic_lr * scale)
        self.actor_optimizer = torch.optim.Adam(agent.actor.parameters(), spec.actor_lr * scale)
        self.encoder_optimizer = (
            torch.optim.Adam(agent.encoder.parameters(), spec.encoder_lr * scale)
            if agent.encoder is not None and config.finetune_encoder else None)
        self.updates = 0
        self.warmup_updates = int(config.critic_warmup * config.updates)

    def _batch(self, task_ids: np.ndarray) -> TransitionBatch:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "action", "reward",
                                                                 "next_obs")}
        for t in task_ids:
            index = torch.from_numpy(self.rng.integers(0, self.sizes[t],
                                                       size=self.config.batch_size))
            for key in parts:
                parts[key].append(self.data[t][key][index])
        return TransitionBatch(**{k: torch.stack(v) for k, v in parts.items()})

    def _context(self, task_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive windows per task: context (T, K, D), mask (T, K) with random fill."""
        k = self.window
        rows, masks = [], []
        for t in task_ids:
            size = int(self.sizes[t])
            start = int(self.rng.integers(0, max(1, size - k + 1)))
            index = np.arange(start, start + k)
            inside = index < size
            index = np.minimum(index, size - 1)
            d = self.data[t]
            rows.append(make_transition(d["obs"][index], d["action"][index], d["reward"][index],
                                        d["next_obs"][index]))
            fill = int(self.rng.integers(min(self.config.min_context, k), k + 1))
            mask = (np.arange(k) >= k - fill) & inside
            masks.append(torch.from_numpy(mask.astype(np.float32)))
        return torch.stack(rows), torch.stack(masks)

    def update(self) -> dict[str, float]:
        """One TD3+BC step on a meta-batch of tasks (see the module doc)."""
        agent, spec, c = self.agent, self.agent.spec, self.config
        count = len(self.data)
        task_ids = self.rng.choice(count, size=min(c.meta_batch_tasks, count), replace=False)
        batch = self._batch(task_ids)
        num_tasks, per_task = batch.reward.shape
        kl = torch.zeros(())
        if spec.conditioning == "latent":
            assert agent.encoder is not None
            context, mask = self._context(task_ids)
            mu, var = agent.encoder.posterior(context, mask)
            z = mu + var.sqrt() * torch.randn(mu.shape, generator=self.generator)
            kl = kl_to_standard_normal(mu, var).mean()
            if self.encoder_optimizer is None:
                z = z.detach()
        else:
            z = torch.zeros(num_tasks, 0)
        cond = z.unsqueeze(1).expand(-1, per_task, -1).reshape(num_tasks * per_task, -1)
        flat = batch.flatten()
        x = torch.cat([flat.obs, cond], dim=-1)
        next_x = torch.cat([flat.next_obs, cond.detach()], dim=-1)
        with torch.no_grad():
            next_action = agent.actor(next_x)
            next_q = agent.critic_target(next_x, next_action).min(0).values
            target = flat.reward + spec.gamma * next_q
        q = agent.critic(x, flat.action)
        critic_loss = (q - target).pow(2).mean(-1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        if self.encoder_optimizer is not None:
            self.encoder_optimizer.zero_grad(set_to_none=True)
        (critic_loss + spec.kl_weight * kl).backward()
        self.critic_optimizer.step()
        if self.encoder_optimizer is not None:
            self.encoder_optimizer.step()

        stats = {"critic_loss": critic_loss.item(), "q_mean": q.mean().item(), "kl": kl.item()}
        self.updates += 1
        if self.updates <= self.warmup_updates:
            self._polyak()
            return {**stats, "actor_loss": float("nan"), "bc_mse": float("nan")}
        x_actor = x.detach()
        agent.critic.requires_grad_(False)
        action = agent.actor(x_actor)
        q_pi = agent.critic(x_actor, action)[0]
        lam = c.bc_alpha / q_pi.abs().mean().detach().clamp_min(1e-6)
        bc = (action - flat.action).pow(2).mean()
        actor_loss = -lam * q_pi.mean() + bc
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        agent.critic.requires_grad_(True)
        self._polyak()
        return {**stats, "actor_loss": actor_loss.item(), "bc_mse": bc.item()}

    def _polyak(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(list(self.agent.critic_target.parameters()),
                                 list(self.agent.critic.parameters()), self.agent.spec.tau)

    def run(self, progress: bool = False) -> dict[str, float]:
        from tqdm import tqdm

        self.agent.train()
        stats: dict[str, float] = {}
        sums: Counter = Counter()
        bar = tqdm(range(self.config.updates), disable=not progress, desc="retrain",
                   unit="upd", dynamic_ncols=True, mininterval=0.5)
        start = time.perf_counter()
        for step in bar:
            stats = self.update()
            if step >= self.config.updates - 100:
                sums.update(stats)
            if step % 50 == 0:
                bc = stats["bc_mse"]
                bar.set_postfix(q=f"{stats['q_mean']:.2f}", qloss=f"{stats['critic_loss']:.3f}",
                                bc="critic warm-up" if bc != bc else f"{bc:.4f}")
        bar.close()
        self.agent.eval()
        last = min(100, self.config.updates)
        result = {f"final/{k}": v / last for k, v in sums.items()}
        result["updates"] = self.updates
        result["seconds"] = time.perf_counter() - start
        return result
