"""How closely a trained oracle imitates the privileged teacher, and what that costs in mrad.

    python benchmarks/teacher_imitation.py runs/oracle/model.pt [--mass 2.0] [--seed 11]

One 4 s episode of the compliant env with a payload (no other fault) from the start, run twice
with the same reference: once with the oracle's deterministic action (told the true task),
once with the teacher's label itself (``ArmTrackingEnv.teacher_action``). Prints the RMS
tracking error of both (mrad, after the first 0.5 s) and the RMS difference between the
oracle's action and the label per joint (action units and N*m), and for a model-structured
actor (``agent.actor_head: model``) its estimate of the payload and the motors.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from metarl_ros.learning.checkpoint import model_env_config
from metarl_ros.learning.model_actor import ModelFeedForwardActor
from metarl_ros.learning.saved_model import load_model
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams
from metarl_ros.sim.true_dynamics import fault_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an oracle model.pt")
    parser.add_argument("--mass", type=float, default=2.0, help="payload, kg")
    parser.add_argument("--seed", type=int, default=11, help="reference seed")
    args = parser.parse_args()
    loaded = load_model(args.model)
    agent = loaded.agent
    setup = load_env_setup(model_env_config(loaded.payload, loaded.path))
    if agent.spec.conditioning != "oracle":
        raise SystemExit(f"{args.model}: a {agent.spec.conditioning!r}-conditioned model; "
                         "this check needs an oracle")
    n = setup.robot.num_joints
    task = TaskParams(payload_mass=args.mass, payload_offset=(0.0, 0.0, 0.05)).normalized(n)
    condition = torch.as_tensor(task.oracle_vector(n), dtype=torch.float32)[None]
    scale = np.asarray(setup.robot.action_scale)
    skip = int(round(0.5 / setup.control_dt))
    for actor in ("oracle", "teacher"):
        env = ArmTrackingEnv(setup, task=task)
        obs, _ = env.reset(seed=args.seed)
        gaps, errors = [], []
        for _ in range(setup.episode_steps):
            label = env.teacher_action()
            action = agent.act(torch.as_tensor(obs)[None], condition, True)[0].numpy()
            gaps.append(action - label)
            obs, _, _, _, info = env.step(action if actor == "oracle" else label)
            errors.append(info["tracking_error"])
        env.close()
        rms = float(np.sqrt(np.mean(np.square(errors[skip:]))) * 1e3)
        line = f"{actor:8s} RMS tracking error {rms:6.2f} mrad"
        if actor == "oracle":
            gap = np.sqrt(np.mean(np.square(gaps[skip:]), axis=0))
            units = " ".join(f"{v:.3f}" for v in gap)
            torque = " ".join(f"{v:.2f}" for v in gap * scale)
            line += f"; |action - label| RMS per joint [{units}] = [{torque}] N*m"
        print(line)
    actor = agent.actor
    if isinstance(actor, ModelFeedForwardActor):  # the estimate of the robot itself
        x = torch.cat([torch.as_tensor(obs)[None], condition], dim=-1)
        theta = actor.physical_parameters(x)[0].detach().numpy()
        truth = fault_parameters(task, n)
        print(f"estimate: payload mass {theta[n]:.3f} kg (true {truth[n]:.3f}), first moment "
              f"{np.round(theta[n + 1:n + 4], 3)} kg*m (true {np.round(truth[n + 1:n + 4], 3)}), "
              f"strength 1/(1 + u) {np.round(1.0 / (1.0 + theta[:n]), 2)} (true 1)")


if __name__ == "__main__":
    main()
