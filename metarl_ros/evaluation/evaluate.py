"""``metarl eval``: every method on a split, each episode hit by a fault halfway.

Protocol (:func:`metarl_ros.sim.tasks.fault_episodes`): an episode starts on the intact robot;
at a time drawn from the task suite's ``fault_time_s`` range the split's task strikes. Every
method sees the same episodes (reference trajectories, fault times, sensor-noise seeds).

Methods: ``oracle`` (true task vector), ``robust`` (no context), ``nominal`` (trained on the
intact robot), ``pearl`` (streaming posterior mean), ``maml`` (robust policy + MAML-adapted
dynamics correction), ``pearl_maml`` (PEARL + MAML correction with the latent-conditioned
dynamics model).

Metrics per method (mean and std over episodes where it says so):

* ``normalized_return``: ``(R - R_nominal) / (R_oracle - R_nominal)`` with ``R`` the method's
  post-fault return *summed over the split* -- the share of the fault's damage that the method
  wins back (oracle = 1, nominal = 0). ``normalized_return_full`` does the same with whole
  episodes.
* ``recover_time_s``: sim seconds after the fault until the rolling 0.25 s tracking error stays
  within 10 % of the oracle's rolling error (plus an absolute floor of 0.005 rad so that noise
  around a near-zero oracle error does not count as a failure) until the episode ends. Episodes
  that never recover count the remaining time; ``recovered_fraction`` says how many did.
* ``tracking_error_before`` / ``tracking_error_after``: mean ``||q_ref - q||`` (rad) before and
  after the fault.
* ``action_oscillation``: mean ``|a_t - 2 a_{t-1} + a_{t-2}| / 4`` over steps and joints, in
  units of the normalized action: the amplitude of a step-to-step alternation
  (``a_t = A (-1)^t`` gives ``A``, a ramp gives 0) -- what shakes a robot, invisible in the
  tracking error of a stiff simulated arm.
* ``post_fault_gain_vs_base`` (``maml``, ``pearl_maml``): the per-episode post-fault return
  minus that of the same policy without the MAML correction (``robust``, ``pearl``) on the
  same episodes, mean and standard error -- what the correction itself adds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metarl_ros.core.files import atomic_write_json
from metarl_ros.learning.checkpoint import CheckpointError, model_env_config
from metarl_ros.learning.rollout import (
    RolloutResult,
    VectorRollout,
    fault_steps_of,
    mean_before_after,
)
from metarl_ros.learning.saved_model import LoadedModel, load_model
from metarl_ros.policy.dynamics_adaptation import DynamicsAdaptation, dynamics_for
from metarl_ros.sim.env_config import EnvSetup, load_env_setup
from metarl_ros.sim.tasks import FaultEpisode, fault_episodes, make_split, nominal_task

METHODS = ("oracle", "robust", "nominal", "pearl", "maml", "pearl_maml")
# which trained model each method runs, and whether it adds MAML correction
_SOURCE = {
    "oracle": ("oracle", False),
    "robust": ("robust", False),
    "nominal": ("nominal", False),
    "pearl": ("pearl", False),
    "maml": ("robust", True),
    "pearl_maml": ("pearl", True),
}
ROLLING_WINDOW_S = 0.25
RECOVERY_RATIO = 1.10
RECOVERY_FLOOR_RAD = 0.005


@dataclass
class MethodRun:
    """All episodes of one method: arrays (episodes, steps[, dim])."""

    reward: np.ndarray
    tracking_error: np.ndarray
    latent_mean: np.ndarray
    action: np.ndarray  # (episodes, steps, act_dim), what was applied (after any correction)


class MAMLCorrection:
    """Rollout hook: one :class:`DynamicsAdaptation` per env, stepping inline at 10 Hz -- the
    same schedule as the robot's background thread, so evaluation measures what deploys."""

    def __init__(
        self,
        loaded_dynamics_owner: LoadedModel,
        with_latent: bool,
        num_envs: int,
        adapt_every: int,
    ) -> None:
        model = dynamics_for(loaded_dynamics_owner, with_latent)
        config = loaded_dynamics_owner.maml_config
        assert config is not None
        self.adaptations = [
            DynamicsAdaptation(model, config, adapt_every=adapt_every) for _ in range(num_envs)
        ]

    def correct(
        self, obs: np.ndarray, action: np.ndarray, latent: np.ndarray | None
    ) -> np.ndarray:
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


def load_method_models(model_root: Path, methods: Sequence[str]) -> dict[str, LoadedModel]:
    """``model_root/<name>/model.pt`` for every trained model the methods need."""
    def users(name: str) -> list[str]:
        """The methods that need model ``name``: the policy's source, and the PEARL run for
        every MAML method (it trains the dynamics models)."""
        return [m for m in methods if _SOURCE[m][0] == name or (name == "pearl" and _SOURCE[m][1])]

    needed = sorted({"oracle", "nominal"} | {name for name, _ in _SOURCE.values() if users(name)})
    models: dict[str, LoadedModel] = {}
    for name in needed:
        path = model_root / name / "model.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; method(s) {users(name) or [name]} need it (oracle and "
                "nominal are needed for normalization, the PEARL run's dynamics models by the "
                "MAML methods)"
            )
        models[name] = load_model(path)
        if models[name].method != name:
            raise CheckpointError(
                f"{path}: holds a {models[name].method!r} model, expected {name!r}"
            )
    return models


def context_window(models: dict[str, LoadedModel]) -> int:
    """The streaming-posterior window of the latent-conditioned model (its contract's), or 1
    when no loaded model uses a latent: the window of the model that needs it, not of whichever
    model loads first."""
    latent = [m for m in models.values() if m.agent.spec.conditioning == "latent"]
    return latent[0].contract.window_size if latent else 1


def run_method(
    method: str,
    models: dict[str, LoadedModel],
    setup: EnvSetup,
    episodes: Sequence[FaultEpisode],
    rollout: VectorRollout,
    window: int,
) -> MethodRun:
    source, with_maml = _SOURCE[method]
    loaded = models[source]
    rewards, errors, latents, actions = [], [], [], []
    nominal = nominal_task(setup.robot.num_joints)
    batch = len(rollout.envs)
    for start in range(0, len(episodes), batch):
        chunk = episodes[start : start + batch]
        hook = None
        if with_maml:
            owner = models["pearl"]  # the dynamics models are trained in the PEARL run
            hook = MAMLCorrection(
                owner,
                with_latent=source == "pearl",
                num_envs=len(chunk),
                adapt_every=max(1, int(round(setup.config.control_rate_hz / 10))),
            )
        result: RolloutResult = rollout.run(
            loaded.agent,
            [nominal] * len(chunk),
            [e.seed for e in chunk],
            faults=[e.faults() for e in chunk],
            deterministic=True,
            latent_mode="mean",
            window=window,
            hook=hook,
        )
        rewards.append(result.reward)
        errors.append(result.tracking_error)
        latents.append(result.latent_mean)
        actions.append(result.action)
    return MethodRun(np.concatenate(rewards), np.concatenate(errors), np.concatenate(latents),
                     np.concatenate(actions))


def action_oscillation(action: np.ndarray) -> np.ndarray:
    """Per episode, the mean amplitude of step-to-step alternation of the actions:
    ``mean_t,j |a_t - 2 a_{t-1} + a_{t-2}| / 4`` for ``action`` (episodes, steps, act_dim);
    shape (episodes,)."""
    second_difference = action[:, 2:] - 2.0 * action[:, 1:-1] + action[:, :-2]
    return np.abs(second_difference).mean(axis=(1, 2)) / 4.0


def rolling_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over ``width`` steps along the last axis (shorter at the start)."""
    csum = np.cumsum(x, axis=-1)
    out = csum.copy()
    out[..., width:] = csum[..., width:] - csum[..., :-width]
    counts = np.minimum(np.arange(1, x.shape[-1] + 1), width)
    return out / counts


def recovery_times(
    error: np.ndarray, oracle_error: np.ndarray, fault_steps: Sequence[int], dt: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per episode: seconds from the fault until the rolling error stays within bounds, and
    whether it ever did (else the remaining time is counted)."""
    width = max(1, int(round(ROLLING_WINDOW_S / dt)))
    rolled = rolling_mean(error, width)
    rolled_oracle = rolling_mean(oracle_error, width)
    times, recovered = [], []
    for i, fault in enumerate(fault_steps):
        ok = rolled[i, fault:] <= RECOVERY_RATIO * rolled_oracle[i, fault:] + RECOVERY_FLOOR_RAD
        bad = np.flatnonzero(~ok)
        if bad.size == 0:
            times.append(0.0)
            recovered.append(True)
        elif bad[-1] == ok.size - 1:
            times.append(ok.size * dt)
            recovered.append(False)
        else:
            times.append((bad[-1] + 1) * dt)
            recovered.append(True)
    return np.asarray(times), np.asarray(recovered)


def bootstrap_normalized_return(
    method: np.ndarray,
    oracle: np.ndarray,
    nominal: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``sum(method - nominal) / sum(oracle - nominal)``.

    Args:
        method, oracle, nominal: post-fault return per episode, each (episodes,), paired (the
            same episodes); episodes are resampled with replacement, the same indices for all
            three.
    """
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(method), size=(resamples, len(method)))
    gap = (oracle[index] - nominal[index]).sum(axis=1)
    won = (method[index] - nominal[index]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = won / gap
    low, high = np.nanpercentile(ratio, [2.5, 97.5])
    return float(low), float(high)


def summarize(runs: dict[str, MethodRun], episodes: Sequence[FaultEpisode], dt: float) -> dict:
    fault_steps = fault_steps_of(episodes, dt)
    post_oracle = post_per_episode(runs["oracle"], fault_steps)
    post_nominal = post_per_episode(runs["nominal"], fault_steps)

    def post(run: MethodRun) -> float:
        return float(sum(post_per_episode(run, fault_steps)))

    oracle, nominal = runs["oracle"], runs["nominal"]
    gap_post = post(oracle) - post(nominal)
    gap_full = float(oracle.reward.sum() - nominal.reward.sum())
    summary = {}
    for name, run in runs.items():
        times, recovered = recovery_times(
            run.tracking_error, oracle.tracking_error, fault_steps, dt
        )
        before, after = mean_before_after(run.tracking_error, fault_steps)
        returns = run.reward.sum(axis=1)
        summary[name] = {
            "normalized_return": (post(run) - post(nominal)) / gap_post
            if gap_post
            else float("nan"),
            "normalized_return_ci95": list(
                bootstrap_normalized_return(
                    post_per_episode(run, fault_steps), post_oracle, post_nominal
                )
            ),
            "normalized_return_full": float((run.reward.sum() - nominal.reward.sum()) / gap_full)
            if gap_full
            else float("nan"),
            "return_mean": float(returns.mean()),
            "return_std": float(returns.std()),
            "post_fault_return_sum": post(run),
            "recover_time_s_mean": float(times.mean()),
            "recover_time_s_std": float(times.std()),
            "recovered_fraction": float(recovered.mean()),
            "tracking_error_before_mean": float(before.mean()),
            "tracking_error_before_std": float(before.std()),
            "tracking_error_after_mean": float(after.mean()),
            "tracking_error_after_std": float(after.std()),
            "action_oscillation": float(action_oscillation(run.action).mean()),
        }
        base = _SOURCE[name][0]
        if _SOURCE[name][1] and base in runs:
            # paired over the same episodes: does the MAML correction change the return?
            gain = post_per_episode(run, fault_steps) - post_per_episode(runs[base], fault_steps)
            summary[name]["post_fault_gain_vs_base"] = {
                "base": base,
                "mean": float(gain.mean()),
                "sem": float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0,
            }
    return summary


def post_per_episode(run: MethodRun, fault_steps: Sequence[int]) -> np.ndarray:
    """Post-fault return of each episode, (episodes,)."""
    return np.array([run.reward[i, s:].sum() for i, s in enumerate(fault_steps)])


def plot_around_fault(
    runs: dict[str, MethodRun], episodes: Sequence[FaultEpisode], dt: float, path: Path, title: str
) -> None:
    """Mean tracking error from 1 s before to 1.5 s after the fault, one line per method: over
    every episode (left), and on a log scale over the episodes without a locked joint (right),
    where the error a locked joint leaves (the same for every method) does not hide the
    differences between methods."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    before_s, after_s = 1.0, 1.5
    lo, hi = int(before_s / dt), int(after_s / dt)
    axis = np.arange(-lo, hi) * dt
    steps = fault_steps_of(episodes, dt)
    unlocked = [not e.task.locked_joints for e in episodes]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    panels = (
        (axes[0], [True] * len(episodes), "all episodes", "linear"),
        (axes[1], unlocked, f"{sum(unlocked)} episodes without a locked joint", "log"),
    )
    for ax, keep, label, scale in panels:
        for name, run in runs.items():
            rows = [
                run.tracking_error[i, s - lo : s + hi]
                for i, s in enumerate(steps)
                if keep[i] and s - lo >= 0 and s + hi <= run.tracking_error.shape[1]
            ]
            if rows:
                ax.plot(axis, np.mean(rows, axis=0), label=name)
        ax.axvline(0.0, color="k", linestyle="--", linewidth=0.8)
        ax.set_yscale(scale)
        ax.set_xlabel("time since fault [s]")
        ax.set_ylabel("tracking error ||q_ref - q|| [rad]")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    model_root: Path,
    split: str,
    episodes: int,
    seed: int,
    methods: Sequence[str] = METHODS,
    num_envs: int = 10,
) -> tuple[dict, dict[str, MethodRun], list[FaultEpisode], EnvSetup]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CheckpointError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    models = load_method_models(model_root, methods)
    first = next(iter(models.values()))
    setup = load_env_setup(model_env_config(first.payload, first.path))
    for name, loaded in models.items():
        if loaded.contract.joint_names != first.contract.joint_names:
            raise CheckpointError(f"{loaded.path}: joint names differ from {first.path}")
    window = context_window(models)
    tasks = make_split(setup.tasks, split, setup.robot.friction_scale)  # type: ignore[arg-type]
    plan = fault_episodes(setup.tasks, tasks, episodes, seed)
    rollout = VectorRollout(setup, min(num_envs, episodes))
    runs_all = sorted(set(methods) | {"oracle", "nominal"}, key=METHODS.index)
    runs = {m: run_method(m, models, setup, plan, rollout, window) for m in runs_all}
    rollout.close()
    summary = summarize(runs, plan, setup.control_dt)
    return summary, runs, plan, setup


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="metarl eval")
    columns = ("method", "norm. return", "95% CI", "recover s", "recovered", "err before",
               "err after", "oscillation")
    for column in columns:
        table.add_column(column, justify="right")
    for name, m in summary.items():
        low, high = m["normalized_return_ci95"]
        table.add_row(
            name,
            f"{m['normalized_return']:.3f}",
            f"{low:.2f}..{high:.2f}",
            f"{m['recover_time_s_mean']:.2f}±{m['recover_time_s_std']:.2f}",
            f"{m['recovered_fraction']:.0%}",
            f"{m['tracking_error_before_mean']:.4f}",
            f"{m['tracking_error_after_mean']:.4f}",
            f"{m['action_oscillation']:.3f}",
        )
    # a pipe or a log file gets the whole table, not rich's 80-column default
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def evaluate_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(int(os.environ.get("METARL_TORCH_THREADS", "1")))
    model_root = Path(args.model)
    if model_root.is_file():
        raise CheckpointError(
            f"{model_root}: eval compares methods; give the directory holding "
            "oracle/, robust/, nominal/, pearl/"
        )
    methods = args.methods.split(",") if args.methods else list(METHODS)
    if args.episodes < 1:
        raise CheckpointError("--episodes must be >= 1")
    summary, runs, plan, setup = evaluate(
        model_root, args.split, args.episodes, args.seed, methods
    )
    print_table(summary)
    atomic_write_json(
        Path(args.json),
        {
            **summary,
            "protocol": {
                "split": args.split,
                "episodes": args.episodes,
                "seed": args.seed,
                "models": str(model_root),
                "control_dt": setup.control_dt,
                "rolling_window_s": ROLLING_WINDOW_S,
                "recovery_ratio": RECOVERY_RATIO,
                "recovery_floor_rad": RECOVERY_FLOOR_RAD,
            },
        },
        allow_nan=True,
    )
    print(f"wrote {args.json}")
    if args.plot:
        plot_around_fault(
            runs,
            plan,
            setup.control_dt,
            Path(args.plot),
            f"{args.split}: tracking error around the fault ({args.episodes} episodes)",
        )
        print(f"wrote {args.plot}")
    return 0
