"""``metarl train``: meta-training loop with checkpoint / resume.

One iteration (PEARL-style, Rakelly et al. 2019, Alg. 1, with online posteriors):

1. sample ``envs_per_iteration`` training tasks and run one episode on each in lockstep, the
   policy conditioned on the streaming posterior over its own last ``context_window``
   transitions (with ``z = mu + std * eps``, ``eps`` fixed per episode: posterior sampling);
   with ``fault_episode_fraction`` some episodes start intact and the task strikes mid-way;
2. ``updates_per_iteration`` SAC updates on meta-batches of ``meta_batch_tasks`` tasks: for
   each task ``batch_size`` RL transitions from its buffer and, by ``context_sampling``,
   either one context of consecutive transitions for all of them (``task``, PEARL's; random
   fill ``min_context..window``, as the window is after a reset or a fault) or each
   transition's own trailing window in its episode (``trailing``, the deployed posterior);
3. (PEARL runs) MAML meta-steps for the two dynamics models the online adapter uses: one
   conditioned on the PEARL latent (``pearl_maml``), one without (``maml``).

The same loop trains the baselines: ``oracle`` (true task vector), ``robust`` (no context,
same tasks), ``nominal`` (no context, intact robot only).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metarl_ros import __version__
from metarl_ros.core.files import remove_stale_temp_files
from metarl_ros.core.resources import resolve_path
from metarl_ros.learning import maml
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
from metarl_ros.learning.encoder import TrailingContexts, make_transition, trailing_windows
from metarl_ros.learning.replay import MultiTaskReplay, TransitionBatch
from metarl_ros.learning.rollout import VectorRollout, fault_steps_of, mean_before_after
from metarl_ros.learning.torque_model import PDStructure, TorqueGainDynamics
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


def training_tasks(config: TrainConfig, setup: EnvSetup) -> list[TaskParams]:
    if config.method == "nominal":
        return [nominal_task(setup.robot.num_joints)]
    return make_split(setup.tasks, "train", setup.robot.friction_scale)


def intact_task_index(tasks: list[TaskParams], num_joints: int) -> int | None:
    """Index of the intact robot (:func:`nominal_task`) in ``tasks``, or None."""
    key = nominal_task(num_joints).key()
    return next((i for i, t in enumerate(tasks) if t.key() == key), None)


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
        n = self.setup.robot.num_joints
        self.tasks = training_tasks(config, self.setup)
        self.heldout = make_split(self.setup.tasks, "heldout", self.setup.robot.friction_scale)
        self.intact_task = intact_task_index(self.tasks, n)
        if config.intact_fraction > 0 and self.intact_task is None:
            raise ValueError(
                "intact_fraction > 0 needs the intact robot among the training tasks "
                "(include_nominal: true in the task suite's train split)"
            )
        self.spec = config.agent_spec(
            self.setup.obs_dim, self.setup.act_dim, oracle_vector_size(n)
        )
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.agent = ConditionedSAC(self.spec)
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
        # the true task vector is stored per transition (it changes at a mid-episode fault):
        # the oracle's condition, or the target of PEARL's task inference
        self.records_task = (
            self.spec.conditioning == "oracle" or self.spec.task_inference_weight > 0
        )
        self.replay = MultiTaskReplay(
            len(self.tasks),
            config.replay_capacity_per_task,
            self.setup.obs_dim,
            self.setup.act_dim,
            cond_dim=self.spec.oracle_dim if self.records_task else 0,
        )
        self.rollout = VectorRollout(self.setup, config.envs_per_iteration)
        self.eval_rollout = VectorRollout(self.setup, config.eval_tasks)
        self.dynamics: dict[str, maml.DynamicsModel | TorqueGainDynamics] = {}
        self.meta_trainers: dict[str, maml.MAMLTrainer] = {}
        if config.method == "pearl" and config.dynamics.enabled:
            # own RNG stream: the policy's training does not depend on the dynamics model
            with torch.random.fork_rng():
                torch.manual_seed(config.seed + 1)
                self._build_dynamics()
        self.iteration = 0
        self.env_steps = 0
        self.updates = 0
        self.normalizer_fitted = False
        self.checkpoints = CheckpointDirectory(self.run_dir)
        self.writer = None

    # ------------------------------------------------------------------ setup

    def _maml_config(self) -> maml.MAMLConfig:
        d = self.config.dynamics
        return maml.MAMLConfig(
            hidden_sizes=tuple(d.hidden_sizes),
            inner_steps=d.inner_steps,
            inner_lr=d.inner_lr,
            first_order=d.first_order,
            max_step_norm=d.max_step_norm,
        )

    def _build_dynamics(self) -> None:
        d = self.config.dynamics
        target_dim = d.target_blocks * self.setup.robot.num_joints
        for name, latent_dim in (("dynamics_latent", self.spec.latent_dim), ("dynamics_plain", 0)):
            model: maml.DynamicsModel | TorqueGainDynamics
            if d.model == "torque_gain":
                model = TorqueGainDynamics(
                    self.setup.obs_dim,
                    self.setup.act_dim,
                    latent_dim,
                    tuple(d.hidden_sizes),
                    pd_structure(self.setup),
                    init_step=d.head_init_step,
                )
            else:
                model = maml.DynamicsModel(
                    self.setup.obs_dim,
                    self.setup.act_dim,
                    target_dim,
                    latent_dim=latent_dim,
                    hidden_sizes=tuple(d.hidden_sizes),
                )
            self.dynamics[name] = model
            self.meta_trainers[name] = maml.MAMLTrainer(
                model, self._maml_config(), meta_lr=d.meta_lr
            )

    # ------------------------------------------------------------------ data

    def sample_task_ids(self, count: int) -> list[int]:
        """``count`` training task ids, uniform over the split (without replacement when the
        split is large enough), each slot replaced by the intact robot with probability
        ``intact_fraction``."""
        ids = self.rng.choice(
            len(self.tasks), size=count, replace=len(self.tasks) < count
        ).tolist()
        fraction = self.config.intact_fraction
        if fraction > 0:
            assert self.intact_task is not None
            intact = self.rng.random(count) < fraction
            ids = [self.intact_task if flag else i for i, flag in zip(ids, intact)]
        return [int(i) for i in ids]

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
        )
        for row, task_id in enumerate(task_ids):
            self.replay.add(
                task_id,
                result.obs[row],
                result.action[row],
                result.reward[row],
                result.next_obs[row],
                condition=result.oracle_condition[row] if self.records_task else None,
            )
        self.env_steps += result.reward.size
        return result.returns

    def _consecutive_index(self, task_id: int, length: int) -> np.ndarray:
        buffer = self.replay.tasks[task_id]
        newest_offset = int(self.rng.integers(0, max(1, buffer.size - length + 1)))
        return (buffer.cursor - 1 - newest_offset - np.arange(length)[::-1]) % buffer.capacity

    def sample_context(self, task_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive windows: context (T, K, D) and mask (T, K) with random fill."""
        k = self.config.context_window
        rows = []
        for task_id in task_ids:
            buffer = self.replay.tasks[task_id]
            index = self._consecutive_index(task_id, k)
            rows.append(
                np.concatenate(
                    [
                        buffer.obs[index],
                        buffer.action[index],
                        buffer.reward[index, None],
                        buffer.next_obs[index],
                    ],
                    -1,
                )
            )
        context = torch.from_numpy(np.stack(rows))
        fill = self.rng.integers(self.config.min_context, k + 1, size=len(task_ids))
        mask = torch.from_numpy((np.arange(k)[None, :] >= (k - fill)[:, None]).astype(np.float32))
        return context, mask

    def sample_trailing(
        self, task_ids: list[int]
    ) -> tuple[TransitionBatch, TrailingContexts, torch.Tensor | None]:
        """RL transitions with their deployed contexts (``context_sampling: trailing``).

        Per task, ``context_segments`` runs of ``M = batch_size / context_segments``
        consecutive transitions, each with the ``context_window`` transitions before it.
        Returns the batch (T, batch_size) in segment order, its :class:`TrailingContexts`
        and, if the replay stores them, the RL transitions' true task vectors
        (T, batch_size, oracle_dim), else None.
        """
        c = self.config
        segments, k = c.context_segments, c.context_window
        length = k + c.batch_size // segments
        index = [
            np.stack([self._consecutive_index(task_id, length) for _ in range(segments)])
            for task_id in task_ids
        ]  # per task (S, W) buffer rows, oldest first
        seq = self.replay.batch_at(task_ids, index)  # (T, S, W, ...)
        windows, next_windows = trailing_windows(
            self.replay.gather(task_ids, index, "episode_step"), k
        )
        contexts = TrailingContexts(
            make_transition(seq.obs, seq.action, seq.reward, seq.next_obs), windows, next_windows
        )
        tail = slice(k, None)
        batch = TransitionBatch(
            seq.obs[:, :, tail].flatten(1, 2),
            seq.action[:, :, tail].flatten(1, 2),
            seq.reward[:, :, tail].flatten(1, 2),
            seq.next_obs[:, :, tail].flatten(1, 2),
        )
        task_vectors = None
        if self.records_task:
            stored = self.replay.gather(task_ids, index, "condition")  # (T, S, W, C)
            task_vectors = stored[:, :, tail].flatten(1, 2)
        return batch, contexts, task_vectors

    def update(self) -> dict[str, float]:
        c = self.config
        task_ids = self.sample_task_ids(min(c.meta_batch_tasks, len(self.tasks)))
        context = mask = task_condition = None
        if self.spec.conditioning == "latent" and c.context_sampling == "trailing":
            batch, context, task_condition = self.sample_trailing(task_ids)
        elif self.spec.conditioning == "oracle":
            # each transition with the true task vector it was acted on (T, B, C)
            index = self.replay.sample_index(task_ids, c.batch_size, self.rng)
            batch = self.replay.batch_at(task_ids, index)
            task_condition = self.replay.gather(task_ids, index, "condition")
        else:
            batch = self.replay.sample(task_ids, c.batch_size, self.rng)
        if self.spec.conditioning == "latent" and c.context_sampling == "task":
            context, mask = self.sample_context(task_ids)
        train_actor = self.updates >= c.critic_warmup_updates
        self.updates += 1
        return self.agent.update(
            batch,
            context,
            mask,
            task_condition,
            train_actor=train_actor,
            anchor=self.anchor_actor,
            anchor_weight=c.anchor_weight,
            smoothness_weight=c.smoothness_weight,
        )

    # ------------------------------------------------------------------ dynamics (MAML)

    def _dynamics_window(
        self, task_id: int, latent: bool
    ) -> tuple[maml.TransitionBatch, maml.TransitionBatch]:
        d = self.config.dynamics
        index = self._consecutive_index(task_id, d.support_size + d.query_size)
        buffer = self.replay.tasks[task_id]
        obs = torch.from_numpy(buffer.obs[index])
        action = torch.from_numpy(buffer.action[index])
        next_obs = torch.from_numpy(buffer.next_obs[index])
        z = None
        if latent:
            with torch.no_grad():
                support = slice(0, d.support_size)
                transitions = make_transition(
                    obs[support][-self.config.context_window :],
                    action[support][-self.config.context_window :],
                    torch.from_numpy(
                        buffer.reward[index][: d.support_size][-self.config.context_window :]
                    ),
                    next_obs[support][-self.config.context_window :],
                )
                mu, _ = self.agent.encoder.posterior(transitions.unsqueeze(0))
                z = mu.expand(len(index), -1)
        whole = maml.TransitionBatch(obs, action, next_obs, z)
        return whole[: d.support_size], whole[d.support_size :]

    def _fit_normalizers(self) -> None:
        deltas = []
        for buffer in self.replay.tasks:
            if buffer.size:
                deltas.append(buffer.next_obs[: buffer.size] - buffer.obs[: buffer.size])
        all_deltas = torch.from_numpy(np.concatenate(deltas))
        for model in self.dynamics.values():
            model.fit_normalizer(all_deltas)
        self.normalizer_fitted = True

    def meta_train_dynamics(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        if not self.dynamics:
            return stats
        if not self.normalizer_fitted:
            self._fit_normalizers()
        d = self.config.dynamics
        for _ in range(d.meta_steps_per_iteration):
            task_ids = self.rng.choice(
                len(self.tasks), size=min(d.tasks_per_meta_step, len(self.tasks)), replace=False
            )
            for name, trainer in self.meta_trainers.items():
                windows = [
                    self._dynamics_window(int(t), latent=name == "dynamics_latent")
                    for t in task_ids
                ]
                result = trainer.step(windows)
                stats[f"{name}/pre_adapt_loss"] = result.pre_adapt_loss
                stats[f"{name}/post_adapt_loss"] = result.post_adapt_loss
        return stats

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
        extra = {name: model.state_dict() for name, model in self.dynamics.items()}
        maml_cfg = self._maml_config().to_dict() if self.dynamics else {}
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
                "maml_config": maml_cfg,
                "dynamics_specs": {n: m.spec() for n, m in self.dynamics.items()},
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
            "meta_optimizers": {
                k: t.optimizer.state_dict() for k, t in self.meta_trainers.items()
            },
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
        """Restore the latest checkpoint of ``run_dir``; False if there is none."""
        latest = self.checkpoints.latest()
        if latest is None:
            return False

        payload = load_model_payload(latest / "model.pt")
        state = torch.load(latest / "train_state.pt", map_location="cpu", weights_only=True)
        changes = config_changes(payload["train_config"], self.config)
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
        for name, trainer in self.meta_trainers.items():
            trainer.optimizer.load_state_dict(state["meta_optimizers"][name])
        self.iteration = state["iteration"]
        self.env_steps = state["env_steps"]
        self.updates = state["updates"]
        self.normalizer_fitted = state["normalizer_fitted"]
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

    def _fit_encoder_input(self) -> None:
        """Standardize a ``normalized_delta`` encoder's input on the initial episodes."""
        encoder = self.agent.encoder
        if encoder is None or encoder.input_features != "normalized_delta":
            return
        rows = [
            make_transition(
                *(
                    torch.from_numpy(getattr(buffer, field)[: buffer.size])
                    for field in ("obs", "action", "reward", "next_obs")
                )
            )
            for buffer in self.replay.tasks
            if buffer.size
        ]
        encoder.fit_input_normalizer(torch.cat(rows))

    def collect_initial(self) -> None:
        c = self.config
        ids = [i for i in range(len(self.tasks)) for _ in range(c.initial_episodes_per_task)]
        for start in range(0, len(ids), c.envs_per_iteration):
            self.collect(ids[start : start + c.envs_per_iteration])

    def run(
        self, max_iterations: int | None = None, stop_after_seconds: float | None = None
    ) -> dict:
        """Train until ``total_iterations`` (or ``max_iterations`` more, or a time budget)."""
        from torch.utils.tensorboard import SummaryWriter

        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.iteration)
        if self.iteration == 0 and len(self.replay) == 0:
            self.collect_initial()
            self._fit_encoder_input()
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
                task_ids = self.sample_task_ids(c.envs_per_iteration)
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
