"""Diagnostics of trained policies behind docs/LEARNING.md: not tests, not part of `metarl eval`.

    # how much the actions alternate from one control step to the next on the intact arm
    python benchmarks/policy_diagnostics.py chatter models --episodes 4
    # how far each fine-tuned policy's actions are from the nominal policy's, and how steep its
    # critic is there, on training tasks with a mid-episode fault
    python benchmarks/policy_diagnostics.py actions models --episodes 10
    # what PEARL's posterior mean knows about the task: a quadratic ridge probe fitted on
    # train-split fault episodes, its R^2 on heldout ones
    python benchmarks/policy_diagnostics.py latent models --episodes 100
    # where PEARL trails the oracle after the fault, by the kind of fault (heldout, seed 1)
    python benchmarks/policy_diagnostics.py gap models --episodes 100
    # how many latent dimensions PEARL uses, and how much the actions of PEARL and the oracle
    # depend on their condition (heldout, seed 1)
    python benchmarks/policy_diagnostics.py condition models --episodes 30

``chatter`` prints, per method and joint, the alternation amplitude
(:func:`metarl_ros.evaluation.evaluate.action_oscillation` per joint) and the share of control
steps on which the action's change flips sign, over deterministic episodes on the intact arm
(the first 0.5 s skipped). ``actions`` prints, for robust and PEARL, the median and 90th
percentile of ``||a - a_nominal||`` and of ``||dQ/da||`` (the method's own critic at its own
deterministic actions, min of the twin critics) over every step of fault episodes on the
train split. ``latent`` samples the posterior mean 0.5 s before the fault (the intact arm) and
0.5, 1.0, 1.5, 2.0 s after it, and prints per target (each varying motor's strength, the
payload mass, whether a joint is locked) the probe's R^2 on the heldout episodes. ``gap``
prints, per kind of fault, the post-fault return the oracle, PEARL and robust win over
nominal, summed over the episodes of that kind. ``condition`` prints, from 0.5 s after the
fault on, PEARL's per-dimension spread (std over episodes and steps) of the posterior mean and
its median posterior std (a dimension whose mean barely moves while its std stays near the
prior's 1 carries no task: collapsed), and for PEARL and the oracle the median and 90th
percentile of ``||a(s, c) - a(s, c_before)||``: how far the condition moves the deterministic
action from what the same policy would do on the same state with the condition it had 0.5 s
before the fault.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metarl_ros.evaluation import evaluate as evaluation
from metarl_ros.learning.checkpoint import model_env_config
from metarl_ros.learning.rollout import VectorRollout
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import fault_episodes, make_split, nominal_task

METHODS = ("nominal", "oracle", "robust", "pearl")


def chatter(models: dict, setup, episodes: int) -> None:
    rollout = VectorRollout(setup, episodes)
    intact = [nominal_task(setup.robot.num_joints)] * episodes
    skip = int(round(0.5 / setup.control_dt))
    for name in METHODS:
        result = rollout.run(models[name].agent, intact, list(range(1, episodes + 1)),
                             deterministic=True, latent_mode="mean",
                             window=evaluation.context_window(models))
        action = result.action[:, skip:]
        amplitude = [evaluation.action_oscillation(action[..., j : j + 1]).mean()
                     for j in range(action.shape[-1])]
        change = np.sign(np.diff(action, axis=1))
        flips = (change[:, 1:] * change[:, :-1] < 0).mean(axis=(0, 1))
        print(f"{name:8s} alternation amplitude per joint {np.round(amplitude, 3)}; "
              f"sign flips of the change {np.round(flips, 2)}; "
              f"tracking error {result.tracking_error[:, skip:].mean():.4f} rad")
    rollout.close()


def _fault_rollout(models: dict, setup, split: str, episodes: int, seed: int, name: str):
    """Method ``name``, deterministic, on ``episodes`` fault episodes of ``split``:
    ``(plan, RolloutResult)``."""
    tasks = make_split(setup.tasks, split, setup.robot.friction_scale)
    plan = fault_episodes(setup.tasks, tasks, episodes, seed=seed)
    rollout = VectorRollout(setup, episodes)
    result = rollout.run(models[name].agent, [nominal_task(setup.robot.num_joints)] * episodes,
                         [e.seed for e in plan], faults=[e.faults() for e in plan],
                         deterministic=True, latent_mode="mean",
                         window=evaluation.context_window(models))
    rollout.close()
    return plan, result


def actions(models: dict, setup, episodes: int) -> None:
    nominal = models["nominal"].agent
    for name in ("robust", "pearl"):
        agent = models[name].agent
        _, result = _fault_rollout(models, setup, "train", episodes, 5, name)
        obs = torch.from_numpy(result.obs.reshape(-1, result.obs.shape[-1]))
        condition = torch.from_numpy(result.latent_mean.reshape(obs.shape[0], -1))
        x = torch.cat([obs, condition], -1)
        action = agent.actor(x).detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(agent.critic(x, action).min(0).values.sum(), action)
        with torch.no_grad():
            distance = (action - nominal.actor(obs)).norm(dim=-1)
        slope = gradient.norm(dim=-1)
        print(f"{name:8s} ||a - a_nominal|| median {distance.median():.3f} "
              f"p90 {distance.quantile(0.9):.3f}; ||dQ/da|| median {slope.median():.3f} "
              f"p90 {slope.quantile(0.9):.3f}")


def _latent_samples(models: dict, setup, split: str, episodes: int, seed: int):
    """Posterior means (N, L) and task targets (N, n + 2): motor strengths, payload, locked."""
    plan, result = _fault_rollout(models, setup, split, episodes, seed, "pearl")
    n = setup.robot.num_joints
    steps = evaluation.fault_steps_of(plan, setup.control_dt)
    latents, targets = [], []
    for i, episode in enumerate(plan):
        task = episode.task.normalized(n)
        after = [*task.motor_strength, task.payload_mass, float(bool(task.locked_joints))]
        for offset_s in (-0.5, 0.5, 1.0, 1.5, 2.0):
            k = steps[i] + int(round(offset_s / setup.control_dt))
            if 0 <= k < result.latent_mean.shape[1]:
                latents.append(result.latent_mean[i, k])
                targets.append([1.0] * n + [0.0, 0.0] if offset_s < 0 else after)
    return np.asarray(latents), np.asarray(targets)


def latent(models: dict, setup, episodes: int) -> None:
    def features(z: np.ndarray) -> np.ndarray:
        return np.concatenate([z, z**2, np.ones((len(z), 1))], 1)

    z_fit, y_fit = _latent_samples(models, setup, "train", episodes, seed=5)
    z_test, y_test = _latent_samples(models, setup, "heldout", episodes, seed=1)
    a = features(z_fit)
    weights = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ y_fit)
    predicted = features(z_test) @ weights
    n = setup.robot.num_joints
    names = [f"motor_strength[{j}]" for j in range(n)] + ["payload_mass", "locked"]
    for j, name in enumerate(names):
        spread = y_test[:, j].var()
        if spread == 0:
            continue
        r2 = 1.0 - ((predicted[:, j] - y_test[:, j]) ** 2).mean() / spread
        print(f"{name:18s} heldout R^2 {r2:5.2f} (target std {np.sqrt(spread):.3f})")


def condition(models: dict, setup, episodes: int) -> None:
    for name in ("pearl", "oracle"):
        plan, result = _fault_rollout(models, setup, "heldout", episodes, 1, name)
        steps = evaluation.fault_steps_of(plan, setup.control_dt)
        half_second = int(round(0.5 / setup.control_dt))
        obs = torch.from_numpy(result.obs)
        cond = torch.from_numpy(result.latent_mean if name == "pearl" else result.oracle_condition)
        after = torch.zeros(obs.shape[:2], dtype=torch.bool)
        for i, k in enumerate(steps):
            after[i, k + half_second :] = True
        before = torch.stack([cond[i, max(k - half_second, 0)] for i, k in enumerate(steps)])
        agent = models[name].agent
        with torch.no_grad():
            moved = (agent.actor(torch.cat([obs, cond], -1))
                     - agent.actor(torch.cat([obs, before[:, None].expand_as(cond)], -1)))
        distance = moved.norm(dim=-1)[after]
        if name == "pearl":
            spread = cond[after].std(0).numpy()
            std = torch.from_numpy(result.latent_std)[after].median(0).values.numpy()
            print(f"pearl    posterior mean spread per dimension {np.round(spread, 3)}")
            print(f"pearl    median posterior std per dimension  {np.round(std, 3)}")
        print(f"{name:8s} ||a(s, c) - a(s, c_before)|| median {distance.median():.3f} "
              f"p90 {distance.quantile(0.9):.3f}")


def _fault_kind(task) -> str:
    kinds = [("locked", bool(task.locked_joints)),
             ("motor", bool(task.motor_strength) and min(task.motor_strength) < 1.0),
             ("payload", task.payload_mass > 0.0)]
    return "+".join(name for name, present in kinds if present) or "friction/delay/noise only"


def gap(model_root: Path, episodes: int) -> None:
    summary, runs, plan, setup = evaluation.evaluate(
        model_root, "heldout", episodes, 1, methods=("oracle", "robust", "nominal", "pearl"))
    steps = evaluation.fault_steps_of(plan, setup.control_dt)
    post = {m: evaluation.post_per_episode(runs[m], steps) for m in summary}
    kinds: dict[str, list[int]] = {}
    for i, episode in enumerate(plan):
        kinds.setdefault(_fault_kind(episode.task), []).append(i)
    print("post-fault return won over nominal, summed over the episodes of each kind")
    for kind, index in sorted(kinds.items(), key=lambda item: -len(item[1])):
        won = {m: float((post[m][index] - post["nominal"][index]).sum())
               for m in ("oracle", "pearl", "robust")}
        print(f"{kind:26s} {len(index):3d} episodes: oracle {won['oracle']:7.1f} pearl "
              f"{won['pearl']:7.1f} robust {won['robust']:7.1f}; oracle - pearl "
              f"{won['oracle'] - won['pearl']:6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("chatter", "actions", "latent", "gap", "condition"))
    parser.add_argument("models", type=Path, help="model directory (oracle/, robust/, ...)")
    parser.add_argument("--episodes", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "gap":
        gap(args.models, args.episodes)
        return 0
    models = evaluation.load_method_models(args.models, METHODS)
    first = next(iter(models.values()))
    setup = load_env_setup(model_env_config(first.payload, first.path))
    {"chatter": chatter, "actions": actions, "latent": latent, "condition": condition}[args.what](
        models, setup, args.episodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
