"""Running episodes: one job = one method (one training run) on a chunk of fault episodes.

:func:`run_job` is the unit of work that :func:`~metarl_ros.evaluation.parallel.run_episodes`
hands to worker processes. A job carries only paths and plain data, so it pickles; each process
loads the env setup and the models once and keeps its envs (a reset re-seeds everything an
episode depends on, so results do not depend on which process ran which job before).

Learned methods run batched through :class:`~metarl_ros.learning.rollout.VectorRollout` (one
actor call per step for the chunk), with the MAML correction as its step hook; policies
(:class:`~metarl_ros.evaluation.methods.PolicyMethod`) step one env each. Both return the same
:class:`~metarl_ros.evaluation.metrics.Traces`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl_ros.control.law import effort_command
from metarl_ros.evaluation.episode import policy_steps
from metarl_ros.evaluation.methods import LearnedMethod, MethodSpec, PolicyMethod
from metarl_ros.evaluation.metrics import Traces, second_difference_amplitude
from metarl_ros.sim.env_config import EnvSetup, load_env_setup
from metarl_ros.sim.tasks import FaultEpisode, nominal_task

CHUNK = 8
"""Episodes per job. Fixed, so that the batches (and so the numbers) do not depend on the
number of workers."""


@dataclass(frozen=True)
class EpisodeJob:
    method: MethodSpec
    run: int
    """index of the training run (``--model`` argument)."""
    models: tuple[tuple[str, str], ...]
    """(model name, model.pt path) the method needs."""
    env_config: str
    episodes: tuple[FaultEpisode, ...]
    steps: int | None = None
    """episode length override (tests); default the env's."""


@dataclass
class JobResult:
    traces: Traces
    seconds: float


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def run_job(job: EpisodeJob) -> JobResult:
    """Run ``job`` in this process; the worker function of the parallel interface."""
    start = time.perf_counter()
    setup: EnvSetup = _cached(("setup", job.env_config), lambda: load_env_setup(job.env_config))
    from metarl_ros.learning.rollout import VectorRollout
    from metarl_ros.sim.env import ArmTrackingEnv

    rollout = _cached(("envs", job.env_config), lambda: VectorRollout(setup, 0))
    while len(rollout.envs) < len(job.episodes):  # as many envs as the largest job needed
        rollout.envs.append(ArmTrackingEnv(setup))
    if isinstance(job.method, LearnedMethod):
        traces = _run_learned(job, setup, rollout)
    else:
        traces = _run_policy(job, setup, rollout.envs)
    return JobResult(traces, time.perf_counter() - start)


def commanded_effort(setup: EnvSetup, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The effort command (N*m) the env applied for ``action`` after ``obs`` (each (..., dim)):
    the control law's (:func:`~metarl_ros.control.law.effort_command`: PD, action and any
    feed-forward) on the state and reference the observation holds."""
    n, law = setup.act_dim, setup.law
    scales = law.observation
    flat = np.asarray(obs, np.float64).reshape(-1, obs.shape[-1])
    block = [flat[:, i * n : (i + 1) * n] for i in range(6)]
    q = block[0] + np.asarray(law.default_pose)
    qd = block[1] / scales.velocity_scale
    reference = (q + block[2] / scales.position_error_scale, block[4] / scales.velocity_scale,
                 block[5] / scales.acceleration_scale)
    applied = np.clip(np.asarray(action, np.float64).reshape(-1, n), -1.0, 1.0)
    effort = effort_command(law, applied, q, qd, reference)
    return effort.reshape(action.shape)


def _traces(setup: EnvSetup, obs, action, error) -> Traces:
    """Per-step signals from observations and actions (E, S, dim) and errors (E, S)."""
    effort = commanded_effort(setup, obs, action)
    applied = np.clip(action.astype(np.float64), -1.0, 1.0)
    return Traces(
        error=np.asarray(error, np.float64),
        effort_sq=(effort**2).mean(-1),
        effort_osc=second_difference_amplitude(effort),
        action_osc=second_difference_amplitude(applied),
    )


class MAMLCorrection:
    """Rollout hook: one :class:`DynamicsAdaptation` per env, stepping inline at 10 Hz -- the
    same schedule as the robot's background thread, so evaluation measures what deploys."""

    def __init__(self, dynamics_owner, with_latent: bool, num_envs: int, adapt_every: int,
                 options: dict | None = None):
        from metarl_ros.policy.dynamics_adaptation import DynamicsAdaptation, dynamics_for

        model = dynamics_for(dynamics_owner, with_latent)
        config = dynamics_owner.maml_config
        assert config is not None
        self.adaptations = [
            DynamicsAdaptation(model, config, adapt_every=adapt_every, **(options or {}))
            for _ in range(num_envs)
        ]

    def correct(self, obs: np.ndarray, action: np.ndarray, latent) -> np.ndarray:
        out = np.empty_like(action)
        for i, adaptation in enumerate(self.adaptations[: len(obs)]):
            out[i] = adaptation.apply(obs[i], action[i], None if latent is None else latent[i])
        return out

    def record(self, obs, action, next_obs, latent) -> None:
        for i, adaptation in enumerate(self.adaptations[: len(obs)]):
            adaptation.record(
                obs[i], action[i], next_obs[i], None if latent is None else latent[i]
            )
            adaptation.maybe_step()


class ParameterAdaptationHook:
    """Rollout hook: the parameter adaptation law (one row per env) on top of the policy's
    action, stepped on every executed transition, as
    :class:`~metarl_ros.policy.parameter_adaptation.ParameterAdaptationPolicy` does online."""

    def __init__(self, setup: EnvSetup, num_envs: int, config, inner=None):
        from metarl_ros.policy.parameter_adaptation import ParameterAdaptation

        self.adaptation = ParameterAdaptation(setup.law, setup.control_dt, num_envs, config)
        self.inner = inner

    def correct(self, obs: np.ndarray, action: np.ndarray, latent) -> np.ndarray:
        if self.inner is not None:
            action = self.inner.correct(obs, action, latent)
        return self.adaptation.corrected(obs, action)

    def record(self, obs, action, next_obs, latent) -> None:
        if self.inner is not None:
            self.inner.record(obs, action, next_obs, latent)
        self.adaptation.update(next_obs)


def _load(path: str):
    from metarl_ros.learning.saved_model import load_model

    return _cached(("model", path), lambda: load_model(path))


def _window(loaded) -> int:
    return loaded.contract.window_size if loaded.agent.spec.conditioning == "latent" else 1


def _torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("METARL_TORCH_THREADS", "1")))


def _rollout(spec: LearnedMethod, loaded, owner, setup: EnvSetup, rollout, episodes,
             steps: int | None = None):
    """One batch of ``episodes`` of a learned method on ``rollout``'s first envs; ``owner``
    is the loaded PEARL run (its dynamics models) for MAML methods."""
    count = len(episodes)
    hook = None
    if spec.maml:
        hook = MAMLCorrection(
            owner,
            with_latent=spec.model == "pearl",
            num_envs=count,
            adapt_every=max(1, int(round(setup.config.control_rate_hz / 10))),
            options=dict(spec.maml_options),
        )
    if spec.parameter_adaptation is not None:
        hook = ParameterAdaptationHook(setup, count, spec.parameter_adaptation, inner=hook)
    return rollout.run(
        loaded.agent,
        [nominal_task(setup.robot.num_joints)] * count,
        [e.seed for e in episodes],
        faults=[e.faults() for e in episodes],
        deterministic=True,
        latent_mode="mean",
        window=_window(loaded),
        hook=hook,
        steps=steps,
        latent_lag=spec.latent_lag,
    )


def _run_learned(job: EpisodeJob, setup: EnvSetup, rollout) -> Traces:
    _torch_threads()
    spec = job.method
    assert isinstance(spec, LearnedMethod)
    paths = dict(job.models)
    owner = _load(paths["pearl"]) if spec.maml else None
    result = _rollout(spec, _load(paths[spec.model]), owner, setup, rollout, job.episodes,
                      job.steps)
    return _traces(setup, result.obs, result.action, result.tracking_error)


def _run_policy(job: EpisodeJob, setup: EnvSetup, envs) -> Traces:
    spec = job.method
    assert isinstance(spec, PolicyMethod)
    count, steps = len(job.episodes), job.steps or setup.episode_steps
    envs = envs[:count]
    policies = [spec.build(setup) for _ in range(count)]
    obs = np.zeros((count, steps, setup.obs_dim), np.float32)
    action = np.zeros((count, steps, setup.act_dim), np.float32)
    error = np.zeros((count, steps))
    for i, (env, policy, episode) in enumerate(zip(envs, policies, job.episodes)):
        now, _ = env.reset(seed=int(episode.seed), options={
            "task": nominal_task(setup.robot.num_joints), "faults": episode.faults()})
        policy.reset()
        if spec.privileged:
            policy.set_task(env.true_task)
        for t, step in enumerate(policy_steps(env, policy, now, steps)):
            if spec.privileged and step.info["faults"]:
                policy.set_task(env.true_task)
            obs[i, t], action[i, t] = step.obs, step.action
            error[i, t] = step.info["tracking_error"]
    return _traces(setup, obs, action, error)


def make_jobs(
    spec: MethodSpec,
    run: int,
    models: dict[str, Path],
    env_config: Path,
    episodes: Sequence[FaultEpisode],
    steps: int | None = None,
) -> list[EpisodeJob]:
    """``episodes`` in chunks of :data:`CHUNK`, as jobs of one method run."""
    needed = tuple((name, str(models[name])) for name in spec.models())
    return [
        EpisodeJob(spec, run, needed, str(env_config), tuple(episodes[i : i + CHUNK]), steps)
        for i in range(0, len(episodes), CHUNK)
    ]


# ------------------------------------------------------------- in-process API (benchmarks, tests)


@dataclass
class MethodRun:
    """All episodes of one method: arrays (episodes, steps[, dim])."""

    reward: np.ndarray
    tracking_error: np.ndarray
    latent_mean: np.ndarray
    action: np.ndarray  # (episodes, steps, act_dim), what was applied (after any correction)


def load_method_models(model_root: Path, methods: Sequence[str]) -> dict:
    """``model_root/<name>/model.pt`` (a LoadedModel each) for every trained model the learned
    ``methods`` need, and ``nominal``; checks each file holds the method it is filed under."""
    from metarl_ros.evaluation.methods import METHODS, ModelRun, check_first_run
    from metarl_ros.learning.checkpoint import CheckpointError
    from metarl_ros.learning.saved_model import load_model

    names = sorted({"nominal"} | {m for s in methods for m in METHODS[s].models()})
    found = {n: model_root / n / "model.pt" for n in names
             if (model_root / n / "model.pt").is_file()}
    check_first_run(ModelRun(0, model_root, found), methods)
    from metarl_ros.learning.checkpoint import model_env_config

    models, setups = {}, {}
    for name in names:
        models[name] = loaded = load_model(found[name])
        if loaded.method != name:
            raise CheckpointError(f"{found[name]}: holds a {loaded.method!r} model, "
                                  f"expected {name!r}")
        env_config = model_env_config(loaded.payload, loaded.path)
        if env_config not in setups:
            setups[env_config] = load_env_setup(env_config)
        spec, setup = loaded.agent.spec, setups[env_config]
        if (spec.obs_dim, spec.act_dim) != (setup.obs_dim, setup.act_dim):
            raise CheckpointError(
                f"{found[name]}: observation/action sizes {spec.obs_dim}/{spec.act_dim} do not "
                f"match its env {env_config} ({setup.obs_dim}/{setup.act_dim}): the env file "
                "changed since the model was trained (e.g. observation.model_features); "
                "retrain the model or use the env it was trained with")
    return models


def context_window(models: dict) -> int:
    """The streaming-posterior window of the latent-conditioned model, or 1 without one."""
    latent = [m for m in models.values() if m.agent.spec.conditioning == "latent"]
    return latent[0].contract.window_size if latent else 1


def run_method(method: str, models: dict, setup: EnvSetup, episodes: Sequence[FaultEpisode],
               rollout, window: int | None = None) -> MethodRun:
    """A learned method on ``episodes`` with in-memory ``models`` (from
    :func:`load_method_models`), in batches of ``rollout``'s envs. ``window`` is unused (each
    model uses its own); kept for callers."""
    from metarl_ros.evaluation.methods import METHODS

    spec = METHODS[method]
    assert isinstance(spec, LearnedMethod)
    parts = []
    batch = len(rollout.envs)
    for start in range(0, len(episodes), batch):
        chunk = episodes[start : start + batch]
        parts.append(_rollout(spec, models[spec.model], models.get("pearl"), setup, rollout,
                              chunk))
    return MethodRun(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("reward", "tracking_error", "latent_mean", "action")))


def post_per_episode(run: MethodRun, fault_steps: Sequence[int]) -> np.ndarray:
    """Post-fault return of each episode, (episodes,)."""
    return np.array([run.reward[i, s:].sum() for i, s in enumerate(fault_steps)])
