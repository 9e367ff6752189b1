"""Diagnostics of trained policies behind docs/LEARNING.md: not tests, not part of `metarl eval`.

    # how much the actions alternate from one control step to the next on the intact arm
    python benchmarks/policy_diagnostics.py chatter models --episodes 4
    # how far each fine-tuned policy's actions are from the nominal policy's, and how steep its
    # critic is there, on training tasks with a mid-episode fault
    python benchmarks/policy_diagnostics.py actions models --episodes 10

``chatter`` prints, per method and joint, the alternation amplitude
(:func:`metarl_ros.learning.evaluation.action_oscillation` per joint) and the share of control
steps on which the action's change flips sign, over deterministic episodes on the intact arm
(the first 0.5 s skipped). ``actions`` prints, for robust and PEARL, the median and 90th
percentile of ``||a - a_nominal||`` and of ``||dQ/da||`` (the method's own critic at its own
deterministic actions, min of the twin critics) over every step of fault episodes on the
train split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metarl_ros.learning import evaluation
from metarl_ros.learning.checkpoint import model_env_config
from metarl_ros.learning.rollout import VectorRollout
from metarl_ros.sim.env import load_env_setup
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


def actions(models: dict, setup, episodes: int) -> None:
    tasks = make_split(setup.tasks, "train", setup.robot.friction_scale)
    plan = fault_episodes(setup.tasks, tasks, episodes, seed=5)
    rollout = VectorRollout(setup, episodes)
    nominal = models["nominal"].agent
    for name in ("robust", "pearl"):
        agent = models[name].agent
        result = rollout.run(agent, [nominal_task(setup.robot.num_joints)] * episodes,
                             [e.seed for e in plan], faults=[e.faults() for e in plan],
                             deterministic=True, latent_mode="mean",
                             window=evaluation.context_window(models))
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
    rollout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("chatter", "actions"))
    parser.add_argument("models", type=Path, help="model directory (oracle/, robust/, ...)")
    parser.add_argument("--episodes", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = evaluation.load_method_models(args.models, METHODS)
    first = next(iter(models.values()))
    setup = load_env_setup(model_env_config(first.payload, first.path))
    (chatter if args.what == "chatter" else actions)(models, setup, args.episodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
