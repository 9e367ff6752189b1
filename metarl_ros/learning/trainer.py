"""``metarl train``: meta-training loop with checkpoint / resume.

One iteration (PEARL-style, Rakelly et al. 2019, Alg. 1, with online posteriors):

1. sample ``envs_per_iteration`` training tasks and run one episode on each in lockstep, the
   policy conditioned on the streaming posterior over its own last ``context_window``
   transitions (with ``z = mu + std * eps``, ``eps`` fixed per episode: posterior sampling);
   with ``fault_episode_fraction`` some episodes start intact and the task strikes mid-way;
2. ``updates_per_iteration`` SAC updates on meta-batches of ``meta_batch_tasks`` tasks: for
   each task ``batch_size`` RL transitions from its buffer with their contexts
   (:mod:`metarl_ros.learning.replay_sampling`);
3. (PEARL runs) MAML meta-steps for the two dynamics models the online adapter uses
   (:mod:`metarl_ros.learning.dynamics_training`).

The same loop trains the baselines: ``oracle`` (true task vector), ``robust`` (no context,
same tasks), ``nominal`` (no context, intact robot only).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metarl_ros import __version__
from metarl_ros.control.law import reference_view_matrix
from metarl_ros.core.files import remove_stale_temp_files
from metarl_ros.core.resources import resolve_path
from metarl_ros.learning.agent import ConditionedSAC
from metarl_ros.learning.checkpoint import (
    CheckpointDirectory,
    CheckpointError,
    atomic_torch_save,
    build_model_payload,
    load_model_payload,
    load_state_strict,
    portable_env_path,
)
from metarl_ros.learning.config import TrainConfig, config_changes
from metarl_ros.learning.dynamics_models import AnyDynamics
from metarl_ros.learning.dynamics_training import DynamicsTraining
from metarl_ros.learning.replay import MultiTaskReplay
from metarl_ros.learning.replay_sampling import ReplaySampler
from metarl_ros.learning.rollout import VectorRollout, fault_steps_of, mean_before_after
from metarl_ros.learning.warm_start import warm_start
from metarl_ros.sim.env_config import EnvSetup, load_env_setup
from metarl_ros.sim.tasks import (
    FaultEvent,
    TaskParams,
    fault_episodes,
    make_split,
    nominal_task,
    oracle_vector_size,
)


def policy_contract(setup: EnvSetup, config: TrainConfig) -> dict:
    """The observation/action contract stored in every model file."""
    robot = setup.robot
    return {
        "robot": robot.name,
        "joint_names": list(robot.joint_names),
        "control_rate_hz": setup.config.control_rate_hz,
        "window_size": config.context_window,
        "latent_dim": config.agent.latent_dim if config.method == "pearl" else 0,
        "obs_dim": setup.obs_dim,
        "act_dim": setup.act_dim,
        "action_scale": list(robot.action_scale),
        "effort_limits": list(robot.effort_limits),
        "default_pose": list(robot.default_pose),
        "observation": setup.config.observation.model_dump(),
        "reward": setup.config.reward.model_dump(),
    }


def training_tasks(config: TrainConfig, setup: EnvSetup) -> list[TaskParams]:
    if config.method == "nominal":
        return [nominal_task(setup.robot.num_joints)]
    return make_split(setup.tasks, "train", setup.robot.friction_scale)


class Trainer:
    """Owns the agent, buffers, dynamics models and the loop. ``run()`` trains to the end."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        config_path: Path | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        torch.set_num_threads(config.torch_threads)
        self.env_path = str(
            resolve_path(config.env, base=config_path.parent if config_path else None)
        )
        self.setup = load_env_setup(self.env_path)
        self.tasks = training_tasks(config, self.setup)
        self.heldout = make_split(self.setup.tasks, "heldout", self.setup.robot.friction_scale)
        self.spec = config.agent_spec(
            self.setup.obs_dim, self.setup.act_dim, oracle_vector_size(self.setup.robot.num_joints)
        )
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        view = (torch.as_tensor(reference_view_matrix(self.setup.law), dtype=torch.float32)
                if self.spec.actor_view == "reference" else None)
        self.agent = ConditionedSAC(self.spec, view)
        self.warm_started_from: str | None = None
        if config.init_from:
            source = resolve_path(
                config.init_from, base=config_path.parent if config_path else None
            )
            payload = load_model_payload(source)
            warm_start(self.agent, payload["agent"], payload["agent_spec"], str(source),
                       critic_condition=config.init_critic_condition)
            self.warm_started_from = str(source)
        # the warm-started actor, frozen: the anchor of the trust region (anchor_weight); it
        # is rebuilt from init_from on resume, so checkpoints need not store it
        self.anchor_actor = (
            copy.deepcopy(self.agent.actor).requires_grad_(False)
            if config.anchor_weight > 0
            else None
        )
        # the oracle's condition is stored per transition (it changes at a mid-episode fault)
        self.records_task = self.spec.conditioning == "oracle"
        # each action's teacher label is stored when the actor imitates it
        self.records_teacher = config.teacher_weight > 0 or config.parameter_weight > 0
        self.replay = MultiTaskReplay(
            len(self.tasks),
            config.replay_capacity_per_task,
            self.setup.obs_dim,
            self.setup.act_dim,
            cond_dim=self.spec.oracle_dim if self.records_task else 0,
            teacher=self.records_teacher,
        )
        self.rollout = VectorRollout(self.setup, config.envs_per_iteration)
        self.eval_rollout = VectorRollout(self.setup, config.eval_tasks)
        self.sampler = ReplaySampler(self.replay, self.rng, config)
        self.dynamics_training = (
            DynamicsTraining(config, self.setup, self.agent.encoder, self.sampler)
            if config.method == "pearl" and config.dynamics.enabled
            else None
        )
        self.dynamics: dict[str, AnyDynamics] = (
            self.dynamics_training.models if self.dynamics_training else {}
        )
        self.iteration = 0
        self.env_steps = 0
        self.updates = 0
        self.checkpoints = CheckpointDirectory(self.run_dir)
        self.writer = None

    # ------------------------------------------------------------------ data

    def collect(self, task_ids: list[int], deterministic: bool = False) -> np.ndarray:
        """One episode per task id; store transitions. Returns episode returns.

        With ``fault_episode_fraction`` that share of the episodes starts on the intact robot
        and the task strikes at a time drawn from the suite's ``fault_time_s``."""
        seeds = self.rng.integers(0, 2**31 - 1, size=len(task_ids))
        starts = [self.tasks[i] for i in task_ids]
        faults: list[list[FaultEvent]] = [[] for _ in task_ids]
        if self.config.fault_episode_fraction > 0:
            struck = self.rng.random(len(task_ids)) < self.config.fault_episode_fraction
            times = self.setup.tasks.fault_time_s.sample(self.rng, size=len(task_ids))
            intact = nominal_task(self.setup.robot.num_joints)
            for row in np.flatnonzero(struck):
                faults[row] = [FaultEvent(float(times[row]), starts[row], label="fault")]
                starts[row] = intact
        result = self.rollout.run(
            self.agent,
            starts,
            seeds,
            faults=faults,
            deterministic=deterministic,
            latent_mode="sample",
            window=self.config.context_window,
            record_task=self.records_task,
            record_teacher=self.records_teacher,
        )
        for row, task_id in enumerate(task_ids):
            self.replay.add(
                task_id,
                result.obs[row],
                result.action[row],
                result.reward[row],
                result.next_obs[row],
                condition=result.oracle_condition[row] if self.records_task else None,
                teacher=result.teacher_action[row] if self.records_teacher else None,
            )
        self.env_steps += result.reward.size
        return result.returns

    def update(self) -> dict[str, float]:
        """One SAC (PEARL) update on a meta-batch."""
        c = self.config
        task_ids = self.sampler.task_ids(min(c.meta_batch_tasks, len(self.tasks)))
        batch, context, mask, task_condition = self.sampler.meta_batch(
            task_ids, self.spec.conditioning
        )
        self.updates += 1
        return self.agent.update(
            batch,
            context,
            mask,
            task_condition,
            anchor=self.anchor_actor,
            anchor_weight=c.anchor_weight,
            smoothness_weight=c.smoothness_weight,
            teacher_weight=c.teacher_weight,
            parameter_weight=c.parameter_weight,
        )

    @property
    def normalizer_fitted(self) -> bool:
        return self.dynamics_training is not None and self.dynamics_training.normalizer_fitted

    def meta_train_dynamics(self) -> dict[str, float]:
        return self.dynamics_training.meta_train() if self.dynamics_training else {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Deterministic episodes on held-out tasks with a mid-episode fault."""
        episodes = fault_episodes(
            self.setup.tasks, self.heldout, self.config.eval_tasks, seed=self.config.seed + 1000
        )
        nominal = nominal_task(self.setup.robot.num_joints)
        result = self.eval_rollout.run(
            self.agent,
            [nominal] * len(episodes),
            [e.seed for e in episodes],
            faults=[e.faults() for e in episodes],
            deterministic=True,
            latent_mode="mean",
            window=self.config.context_window,
        )
        before, after = mean_before_after(
            result.tracking_error, fault_steps_of(episodes, self.setup.control_dt))
        return {
            "eval/return": float(result.returns.mean()),
            "eval/tracking_error_before": float(before.mean()),
            "eval/tracking_error_after": float(after.mean()),
        }

    # ------------------------------------------------------------------ persistence

    def model_payload(self) -> dict:
        extra, dynamics_metadata = (
            self.dynamics_training.model_file_parts()
            if self.dynamics_training
            else ({}, {"maml_config": {}, "dynamics_specs": {}})
        )
        return build_model_payload(
            agent_state=self._agent_weights(),
            agent_spec=self.spec,
            train_config=self.config.model_dump(mode="json"),
            env_config_path=portable_env_path(self.env_path),
            contract=policy_contract(self.setup, self.config),
            extra_states=extra,
            metadata={
                "method": self.config.method,
                "iteration": self.iteration,
                "env_steps": self.env_steps,
                "updates": self.updates,
                "metarl_ros_version": __version__,
                **dynamics_metadata,
            },
        )

    def _agent_weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.agent.state_dict().items()}

    def train_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "normalizer_fitted": self.normalizer_fitted,
            "optimizers": {k: o.state_dict() for k, o in self.agent.optimizers().items()},
            "meta_optimizers": (
                self.dynamics_training.optimizer_states() if self.dynamics_training else {}
            ),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self) -> Path:
        files: dict = {"model.pt": self.model_payload(), "train_state.pt": self.train_state()}
        if self.config.save_replay:
            files["replay.npz"] = self.replay.save
        path = self.checkpoints.save(self.iteration, files)
        return path

    def resume(self) -> bool:
        """Restore the latest checkpoint of ``run_dir``; False if there is none. A damaged
        newest checkpoint is skipped for the previous complete one, saying so on stdout. The
        config must be the checkpoint's, except a larger ``total_iterations`` (train longer:
        the same run continued, as if it had been started with that total)."""
        point = self.checkpoints.load_resumable(log=print)
        if point is None:
            return False
        latest, payload, state = point.folder, point.payload, point.state
        changes = config_changes(payload["train_config"], self.config)
        # training longer is the same run: nothing depends on the total but where it stops
        longer = [c for c in changes if c.startswith("total_iterations:")]
        if longer and self.config.total_iterations >= state["iteration"]:
            changes.remove(longer[0])
            print(f"{latest}: continuing to {self.config.total_iterations} iterations "
                  f"({longer[0]})")
        if changes:
            raise CheckpointError(
                f"{latest}: checkpoint was made with a different config ("
                f"{'; '.join(changes)}); use a new --out or the same config"
            )
        load_state_strict(self.agent, payload["agent"], "agent", latest)
        for name, model in self.dynamics.items():
            load_state_strict(model, payload["extra"][name], name, latest)
        for name, optimizer in self.agent.optimizers().items():
            optimizer.load_state_dict(state["optimizers"][name])
        if self.dynamics_training:
            self.dynamics_training.load_optimizer_states(state["meta_optimizers"])
            self.dynamics_training.normalizer_fitted = state["normalizer_fitted"]
        self.iteration = state["iteration"]
        self.env_steps = state["env_steps"]
        self.updates = state["updates"]
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        replay_file = latest / "replay.npz"
        if replay_file.is_file():
            try:
                self.replay.load(replay_file)
            except ValueError as error:
                raise CheckpointError(f"{replay_file}: {error}") from error
        else:  # no stored data: refill before updating again
            self.collect_initial()
        return True

    def write_final_model(self) -> Path:
        path = self.run_dir / "model.pt"
        atomic_torch_save(self.model_payload(), path)
        remove_stale_temp_files(self.run_dir, path.name)
        return path

    # ------------------------------------------------------------------ loop

    def collect_initial(self) -> None:
        c = self.config
        ids = [i for i in range(len(self.tasks)) for _ in range(c.initial_episodes_per_task)]
        for start in range(0, len(ids), c.envs_per_iteration):
            self.collect(ids[start : start + c.envs_per_iteration])

    def run(
        self,
        max_iterations: int | None = None,
        stop_after_seconds: float | None = None,
        on_iteration: Callable[[dict[str, float]], None] | None = None,
    ) -> dict:
        """Train until ``total_iterations`` (or ``max_iterations`` more, or a time budget).
        ``on_iteration`` gets each iteration's statistics, as TensorBoard does (a sweep
        reports them to Ray Tune)."""
        from torch.utils.tensorboard import SummaryWriter

        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration)
        if self.iteration == 0 and len(self.replay) == 0:
            self.collect_initial()
        last_checkpoint = time.monotonic()
        start = time.monotonic()
        end = (
            c.total_iterations
            if max_iterations is None
            else min(c.total_iterations, self.iteration + max_iterations)
        )
        stats: dict[str, float] = {}
        bar = tqdm(
            total=c.total_iterations,
            initial=self.iteration,
            disable=not self.progress,
            desc=f"train {c.method}",
            unit="it",
            dynamic_ncols=True,
        )
        try:
            while self.iteration < end:
                task_ids = self.sampler.task_ids(c.envs_per_iteration)
                t0 = time.perf_counter()
                returns = self.collect(task_ids)
                t1 = time.perf_counter()
                for _ in range(c.updates_per_iteration):
                    stats = self.update()
                t2 = time.perf_counter()
                stats.update(self.meta_train_dynamics())
                t3 = time.perf_counter()
                self.iteration += 1
                stats.update(
                    {
                        "train/return": float(np.mean(returns)),
                        "time/collect_s": t1 - t0,
                        "time/update_ms": 1000.0 * (t2 - t1) / c.updates_per_iteration,
                        "time/dynamics_s": t3 - t2,
                    }
                )
                if self.iteration % c.eval_every_iterations == 0 or self.iteration == end:
                    stats.update(self.evaluate())
                    if not self.progress:
                        print(
                            f"iteration {self.iteration}/{c.total_iterations}: "
                            f"train return {stats['train/return']:.1f}, "
                            f"eval return {stats['eval/return']:.1f}, tracking error "
                            f"{stats['eval/tracking_error_before']:.4f} before / "
                            f"{stats['eval/tracking_error_after']:.4f} after the fault, "
                            f"{stats['time/update_ms']:.0f} ms/update",
                            flush=True,
                        )
                for key, value in stats.items():
                    self.writer.add_scalar(key, value, self.iteration)
                if on_iteration is not None:
                    on_iteration(dict(stats))
                bar.update(1)
                bar.set_postfix(
                    ret=f"{stats['train/return']:.0f}",
                    eval=f"{stats.get('eval/return', float('nan')):.0f}",
                    qloss=f"{stats['critic_loss']:.2f}",
                    upd_ms=f"{stats['time/update_ms']:.0f}",
                )
                if time.monotonic() - last_checkpoint > 60.0 * c.checkpoint_every_minutes:
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                if (
                    stop_after_seconds is not None
                    and time.monotonic() - start > stop_after_seconds
                ):
                    break
        finally:
            bar.close()
        self.save_checkpoint()
        self.write_final_model()
        self.writer.close()
        return stats
