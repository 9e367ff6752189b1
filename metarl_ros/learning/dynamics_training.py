"""Meta-training the MAML dynamics models of a PEARL run on its replay.

Two models are trained, for the two ways the online adapter runs: one conditioned on the PEARL
latent (``dynamics_latent``, for ``pearl_maml``), one without (``dynamics_plain``, for
``maml``). A task's window of ``support_size + query_size`` consecutive transitions is one
MAML task: adapt on the support (the past), predict the query (what follows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metarl_ros.learning.config import TrainConfig
from metarl_ros.learning.dynamics_models import AnyDynamics, make_dynamics
from metarl_ros.learning.encoder import ContextEncoder, make_transition
from metarl_ros.learning.maml_core import MAMLTrainer
from metarl_ros.learning.replay_sampling import ReplaySampler
from metarl_ros.learning.torque_model import PDStructure
from metarl_ros.learning.transitions import TransitionBatch
from metarl_ros.sim.env_config import EnvSetup

MODEL_NAMES = ("dynamics_latent", "dynamics_plain")


def pd_structure(setup: EnvSetup) -> PDStructure:
    """The env's actuation (PD gains, action and observation scales) for the structured
    dynamics model."""
    feedback, observation = setup.config.feedback, setup.config.observation
    return PDStructure(
        kp=tuple(feedback.kp),
        kd=tuple(feedback.kd),
        action_scale=tuple(setup.robot.action_scale),
        position_error_scale=observation.position_error_scale,
        velocity_error_scale=observation.velocity_error_scale,
        velocity_scale=observation.velocity_scale,
    )


class DynamicsTraining:
    """The models (:attr:`models`), their meta-optimisers and whether their target
    normalisers were fitted (on the first data, before the first meta-step).

    Args:
        config: the run's config (its ``dynamics`` section and ``context_window``).
        setup: the env (sizes and actuation).
        encoder: PEARL's encoder: the latent model's ``z`` is the posterior mean over the
            last ``context_window`` transitions of the support.
        sampler: where the windows come from (and the RNG that picks the tasks).
    """

    def __init__(
        self,
        config: TrainConfig,
        setup: EnvSetup,
        encoder: ContextEncoder,
        sampler: ReplaySampler,
    ) -> None:
        self.config = config.dynamics
        self.context_window = config.context_window
        self.encoder = encoder
        self.sampler = sampler
        self.maml_config = self.config.maml_config()
        self.models: dict[str, AnyDynamics] = {}
        self.trainers: dict[str, MAMLTrainer] = {}
        self.normalizer_fitted = False
        pd = pd_structure(setup)
        # own RNG stream: the policy's training does not depend on the dynamics models
        with torch.random.fork_rng():
            torch.manual_seed(config.seed + 1)
            for name, latent_dim in zip(MODEL_NAMES, (encoder.latent_dim, 0), strict=True):
                model = make_dynamics(self.config, setup.obs_dim, setup.act_dim, latent_dim, pd)
                self.models[name] = model
                self.trainers[name] = MAMLTrainer(
                    model, self.maml_config, meta_lr=self.config.meta_lr
                )

    def window(self, task_id: int, latent: bool) -> tuple[TransitionBatch, TransitionBatch]:
        """(support, query) of consecutive transitions of a task."""
        d = self.config
        index = self.sampler.consecutive_index(task_id, d.support_size + d.query_size)
        buffer = self.sampler.replay.tasks[task_id]
        obs = torch.from_numpy(buffer.obs[index])
        action = torch.from_numpy(buffer.action[index])
        next_obs = torch.from_numpy(buffer.next_obs[index])
        z = None
        if latent:
            k = self.context_window
            with torch.no_grad():
                support = slice(0, d.support_size)
                transitions = make_transition(
                    obs[support][-k:],
                    action[support][-k:],
                    torch.from_numpy(buffer.reward[index][: d.support_size][-k:]),
                    next_obs[support][-k:],
                )
                mu, _ = self.encoder.posterior(transitions.unsqueeze(0))
                z = mu.expand(len(index), -1)
        whole = TransitionBatch(obs=obs, action=action, next_obs=next_obs, latent=z)
        return whole[: d.support_size], whole[d.support_size :]

    def fit_normalizers(self) -> None:
        deltas = [
            buffer.next_obs[: buffer.size] - buffer.obs[: buffer.size]
            for buffer in self.sampler.replay.tasks
            if buffer.size
        ]
        all_deltas = torch.from_numpy(np.concatenate(deltas))
        for model in self.models.values():
            model.fit_normalizer(all_deltas)
        self.normalizer_fitted = True

    def meta_train(self) -> dict[str, float]:
        """``meta_steps_per_iteration`` meta-steps of each model; their last losses."""
        stats: dict[str, float] = {}
        if not self.normalizer_fitted:
            self.fit_normalizers()
        d = self.config
        num_tasks = self.sampler.num_tasks
        for _ in range(d.meta_steps_per_iteration):
            task_ids = self.sampler.rng.choice(
                num_tasks, size=min(d.tasks_per_meta_step, num_tasks), replace=False
            )
            for name, trainer in self.trainers.items():
                windows = [self.window(int(t), latent=name == "dynamics_latent") for t in task_ids]
                result = trainer.step(windows)
                stats[f"{name}/pre_adapt_loss"] = result.pre_adapt_loss
                stats[f"{name}/post_adapt_loss"] = result.post_adapt_loss
        return stats

    def model_file_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(extra_states, metadata)`` for the model file: the weights, the MAML config and
        the models' specs."""
        extra = {name: model.state_dict() for name, model in self.models.items()}
        metadata = {
            "maml_config": self.maml_config.to_dict(),
            "dynamics_specs": {name: model.spec() for name, model in self.models.items()},
        }
        return extra, metadata

    def optimizer_states(self) -> dict[str, Any]:
        return {name: t.optimizer.state_dict() for name, t in self.trainers.items()}

    def load_optimizer_states(self, states: dict[str, Any]) -> None:
        for name, trainer in self.trainers.items():
            trainer.optimizer.load_state_dict(states[name])
