"""How fast and how well a model-structured PEARL identifies the robot after a fault, in kg.

    python benchmarks/parameter_estimation.py models/pearl/model.pt [--episodes 30] [--seed 1]

A model-structured actor (``agent.actor_head: model``, ``learning/model_actor.py``) maps its
posterior to physical parameters (payload inertial parameters, motor strengths, friction), so
its adaptation can be read in physical units. Runs the evaluation protocol's episodes on the
held-out split (the intact arm, then the task strikes at 1.5-2.5 s; the streaming posterior of
the last 25 transitions, its mean, as deployed) and prints, at a few times after the fault:

* payload episodes: the mean absolute error of the estimated payload mass (kg), and the share
  of episodes within 20 % of the true mass;
* weak-motor episodes: the mean absolute error of the estimated strength of the damaged
  joints (``s = 1 / (1 + u)``);
* intact (before the fault): the mean estimated payload mass and the lowest strength.

Anchor: Rapid Mismatch Estimation (CoRL 2025) identifies a payload in about 0.4 s on a real
7-DOF arm under impedance control.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from metarl_ros.learning.checkpoint import model_env_config
from metarl_ros.learning.model_actor import ModelFeedForwardActor
from metarl_ros.learning.rollout import VectorRollout
from metarl_ros.learning.saved_model import load_model
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import fault_episodes, make_split, nominal_task

AFTER_S = (0.1, 0.25, 0.5, 1.0, 1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a PEARL model.pt with agent.actor_head: model")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1, help="episode seed")
    parser.add_argument("--batch", type=int, default=10, help="episodes run in lockstep")
    parser.add_argument("--window", type=int, default=None,
                        help="context window (transitions; default: the model's)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    agent, actor = loaded.agent, loaded.agent.actor
    if agent.spec.conditioning != "latent" or not isinstance(actor, ModelFeedForwardActor):
        raise SystemExit(f"{args.model}: needs a PEARL model with agent.actor_head: model")
    setup = load_env_setup(model_env_config(loaded.payload, loaded.path))
    n, dt = setup.robot.num_joints, setup.control_dt
    tasks = make_split(setup.tasks, "heldout", setup.robot.friction_scale)
    plan = fault_episodes(setup.tasks, tasks, args.episodes, args.seed)
    rollout = VectorRollout(setup, args.batch)
    estimates, truths, fault_steps = [], [], []
    try:
        for start in range(0, len(plan), args.batch):
            chunk = plan[start:start + args.batch]
            intact = [nominal_task(n)] * len(chunk)  # each episode starts on the intact arm
            result = rollout.run(agent, intact, [e.seed for e in chunk],
                                 faults=[e.faults() for e in chunk], deterministic=True,
                                 latent_mode="mean", record_teacher=True,
                                 window=args.window or loaded.contract.window_size)
            x = torch.cat([torch.as_tensor(result.obs), torch.as_tensor(result.latent_mean)], -1)
            with torch.no_grad():
                estimates.append(actor.physical_parameters(x).numpy())
            truths.append(result.teacher_action[..., n:])
            fault_steps += [int(round(e.fault_time_s / dt)) for e in chunk]
    finally:
        rollout.close()
    theta, truth = np.concatenate(estimates), np.concatenate(truths)  # (E, S, 3n + 10)
    mass, true_mass = theta[..., n], truth[..., n]
    strength = 1.0 / (1.0 + theta[..., :n])
    true_strength = 1.0 / (1.0 + truth[..., :n])
    print(f"{args.model}: {len(plan)} held-out episodes, fault at 1.5-2.5 s")
    before = np.concatenate([mass[i, 25:k] for i, k in enumerate(fault_steps)])
    weakest = np.concatenate([strength[i, 25:k].min(-1) for i, k in enumerate(fault_steps)])
    print(f"intact arm (0.25 s after reset to the fault): estimated payload "
          f"{before.mean():.2f} kg (mean), lowest estimated strength {weakest.mean():.2f} (mean)")
    payload = [i for i, e in enumerate(plan) if e.task.payload_mass > 0]
    weak = [i for i, e in enumerate(plan) if min(e.task.motor_strength or (1.0,)) < 1.0]
    for after in AFTER_S:
        rows = []
        if payload:
            at = [(i, fault_steps[i] + int(round(after / dt))) for i in payload]
            errors = np.array([abs(mass[i, s] - true_mass[i, s]) for i, s in at])
            within = np.mean([abs(mass[i, s] - true_mass[i, s]) <= 0.2 * true_mass[i, s]
                              for i, s in at])
            rows.append(f"payload |error| {errors.mean():.2f} kg, within 20 %: {within:.0%} "
                        f"({len(payload)} episodes)")
        if weak:
            errors = []
            for i in weak:
                s = fault_steps[i] + int(round(after / dt))
                damaged = true_strength[i, s] < 1.0
                errors.append(np.abs(strength[i, s] - true_strength[i, s])[damaged].mean())
            rows.append(f"damaged-joint strength |error| {np.mean(errors):.2f} "
                        f"({len(weak)} episodes)")
        print(f"{after:4.2f} s after the fault: " + "; ".join(rows))


if __name__ == "__main__":
    main()
