"""Vectorized rollouts: several environments stepped in lockstep under one batched policy.

Per control step there is one encoder call (the newest transition of every env) and one actor
call for all envs, so network overhead does not grow with the number of envs. Each env keeps
its own sliding context window (:class:`~metarl_ros.learning.encoder.BatchedWindows`), exactly
as the robot does at deployment: the posterior is always the streaming one over the last
``window`` transitions, and a fault in the middle of an episode is picked up as the window
refills.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from metarl_ros.control.model_features import num_fault_parameters
from metarl_ros.learning.agent import ConditionedSAC
from metarl_ros.learning.encoder import BatchedWindows, make_transition
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import EnvSetup
from metarl_ros.sim.tasks import FaultEpisode, FaultEvent, TaskParams

LatentMode = Literal["mean", "sample"]


class StepHook(Protocol):
    """Per-step extension of a rollout (the MAML correction uses it).

    Shapes: obs/next_obs (E, obs_dim), action (E, act_dim), latent (E, L) or None. ``obs``
    is the whole observation, not the actor's view of it: a correction of the executed
    torque needs the measured tracking error the PD acts on.
    """

    def correct(
        self, obs: np.ndarray, action: np.ndarray, latent: np.ndarray | None
    ) -> np.ndarray:
        """Return the actions to execute instead of the policy's."""

    def record(
        self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, latent: np.ndarray | None
    ) -> None:
        """See the executed transitions (with the latent the policy had when acting)."""


@dataclass
class RolloutResult:
    """Arrays with leading dims (E envs, S steps)."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    tracking_error: np.ndarray
    latent_mean: np.ndarray  # (E, S, L), empty L for non-latent agents
    latent_std: np.ndarray
    control_dt: float
    # (E, S, C): the true task vector; C is 0 unless oracle conditioning or record_task
    oracle_condition: np.ndarray
    # (E, S, act_dim + 3 act_dim + 10) with record_teacher (each step's privileged label and
    # the true fault parameters: ArmTrackingEnv.teacher_targets), else (E, S, 0)
    teacher_action: np.ndarray

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode, (E,)."""
        return self.reward.sum(axis=1)


class VectorRollout:
    """Owns ``num_envs`` environments and runs batched episodes on them."""

    def __init__(self, setup: EnvSetup, num_envs: int) -> None:
        self.setup = setup
        self.envs = [ArmTrackingEnv(setup) for _ in range(num_envs)]

    def close(self) -> None:
        for env in self.envs:
            env.close()

    @torch.no_grad()
    def run(
        self,
        agent: ConditionedSAC,
        tasks: Sequence[TaskParams],
        seeds: Sequence[int],
        *,
        faults: Sequence[Sequence[FaultEvent]] | None = None,
        deterministic: bool = False,
        latent_mode: LatentMode = "sample",
        window: int = 25,
        hook: StepHook | None = None,
        steps: int | None = None,
        record_task: bool = False,
        record_teacher: bool = False,
        latent_lag: int = 0,
    ) -> RolloutResult:
        """Run one episode on each of ``len(tasks)`` envs.

        Args:
            agent: the policy (any conditioning).
            tasks: task at the start of each episode.
            seeds: per-episode seeds (reference trajectory and sensor noise).
            faults: per-episode fault schedules (mid-episode task changes).
            deterministic: use the actor's mean action instead of sampling.
            latent_mode: ``mean`` uses the posterior mean; ``sample`` draws one noise vector per
                episode and uses ``mu + std * eps`` (temporally consistent posterior sampling).
            window: context window size for the streaming posterior.
            hook: optional per-step correction and observation (MAML adaptation).
            steps: episode length override (default: the env's).
            record_task: record the true task vector of every step for any conditioning (the
                oracle's are always recorded: they are its condition).
            latent_lag: transitions reach the posterior and ``hook.record`` this many steps
                late (after the action of the step they lag into): 0 = the newest transition
                informs the next action; 1 = what a control loop acting on the reference ahead
                of the joint state does (``LoopConfig.act_ahead``: the policy observes a
                transition once the next command is out). ``hook.correct`` is not delayed:
                the loop applies a correction on the measured state at the joint state.
        """
        count = len(tasks)
        if count > len(self.envs):
            raise ValueError(f"{count} tasks but only {len(self.envs)} envs")
        if latent_lag < 0:
            raise ValueError(f"latent_lag must be >= 0, got {latent_lag}")
        spec = agent.spec
        envs = self.envs[:count]
        steps = steps or self.setup.episode_steps
        faults = faults or [[] for _ in range(count)]
        obs = np.stack(
            [
                env.reset(seed=int(seed), options={"task": task, "faults": list(fault)})[0]
                for env, task, seed, fault in zip(envs, tasks, seeds, faults)
            ]
        )
        latent_dim = spec.latent_dim if spec.conditioning == "latent" else 0
        windows = BatchedWindows(count, window, latent_dim) if latent_dim else None
        noise = torch.randn(count, latent_dim) if latent_mode == "sample" else None
        out_obs = np.zeros((count, steps, spec.obs_dim), np.float32)
        out_next = np.zeros_like(out_obs)
        out_action = np.zeros((count, steps, spec.act_dim), np.float32)
        out_reward = np.zeros((count, steps), np.float32)
        out_error = np.zeros((count, steps), np.float32)
        out_mu = np.zeros((count, steps, latent_dim), np.float32)
        out_std = np.zeros((count, steps, latent_dim), np.float32)
        oracle_dim = spec.oracle_dim if spec.conditioning == "oracle" or record_task else 0
        out_oracle = np.zeros((count, steps, oracle_dim), np.float32)
        width = spec.act_dim + num_fault_parameters(spec.act_dim) if record_teacher else 0
        lagging: list[tuple] = []  # (factors, record) of transitions not handed over yet

        def hand_over(factors, record: tuple, mu_np: np.ndarray | None) -> None:
            """A transition reaches the posterior and the hook (with the posterior before
            it, as the policy's observe() does)."""
            if windows is not None:
                windows.push(*factors)
            if hook is not None:
                hook.record(*record, mu_np)

        out_teacher = np.zeros((count, steps, width), np.float32)
        for t in range(steps):
            mu_np = None
            if oracle_dim:
                out_oracle[:, t] = np.stack(
                    [env.true_task.oracle_vector(self.setup.robot.num_joints) for env in envs]
                )
            if windows is not None:
                mu, var = windows.posterior()
                std = var.sqrt()
                condition = mu if noise is None else mu + std * noise
                out_mu[:, t], out_std[:, t] = mu.numpy(), std.numpy()
                mu_np = out_mu[:, t]
            elif spec.conditioning == "oracle":
                condition = torch.from_numpy(out_oracle[:, t])
            else:
                condition = torch.zeros(count, 0)
            obs_t = torch.from_numpy(obs)
            action = agent.act(obs_t, condition, deterministic).numpy()
            if hook is not None:
                action = hook.correct(obs, action, mu_np)
            while len(lagging) > max(0, latent_lag - 1):  # lagged behind this action
                hand_over(*lagging.pop(0), mu_np)
            next_obs = np.empty_like(obs)
            if record_teacher:
                out_teacher[:, t] = np.stack([env.teacher_targets() for env in envs])
            for i, env in enumerate(envs):
                next_obs[i], out_reward[i, t], _, _, info = env.step(action[i])
                out_error[i, t] = info["tracking_error"]
            out_obs[:, t], out_action[:, t], out_next[:, t] = obs, action, next_obs
            factors = None
            if windows is not None:
                transition = make_transition(
                    obs_t,
                    torch.from_numpy(action),
                    torch.from_numpy(out_reward[:, t]),
                    torch.from_numpy(next_obs),
                )
                factors = agent.encoder.factors(transition)
            lagging.append((factors, (obs, action, next_obs)))
            if not latent_lag:
                hand_over(*lagging.pop(), mu_np)
            obs = next_obs
        return RolloutResult(
            out_obs,
            out_action,
            out_reward,
            out_next,
            out_error,
            out_mu,
            out_std,
            self.setup.control_dt,
            out_oracle,
            out_teacher,
        )


def fault_steps_of(episodes: Sequence[FaultEpisode], dt: float) -> list[int]:
    """The control step at which each episode's fault strikes."""
    return [int(round(e.fault_time_s / dt)) for e in episodes]


def mean_before_after(
    values: np.ndarray, fault_steps: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per episode, the mean of ``values`` (episodes, steps) before and from its fault step:
    two arrays of shape (episodes,)."""
    before = np.array([values[i, :s].mean() for i, s in enumerate(fault_steps)])
    after = np.array([values[i, s:].mean() for i, s in enumerate(fault_steps)])
    return before, after
