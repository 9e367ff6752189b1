#!/usr/bin/env python3
"""Benchmark: how much of PyBullet's raw speed ArmTrackingEnv keeps (issue #2).

Measures, in one run:

(a) a bare PyBullet loop on the same robot (``kuka_iiwa/model.urdf`` from pybullet_data,
    fixed base, default motors disabled); per physics step ``setJointMotorControlArray``
    (TORQUE_CONTROL) + ``stepSimulation`` + ``getJointStates``: physics steps/s;
(b) ``ArmTrackingEnv.step`` with pre-generated uniform random actions: env steps/s and the
    equivalent physics steps/s (one env step = sim_rate_hz / control_rate_hz physics steps),
    for the intact robot and for a task with payload + friction + actuator delay;
    for each, also ``ArmSimulation.step`` alone (physics steps/s), to split the env's cost
    into simulation core and env Python layer.

Each measurement is repeated ``--repeats`` times; the table shows the median (and min/max).
Only the stepping loops are timed (``time.perf_counter``); resets between episodes are not.

Not a test: run it by hand on a quiet machine::

    .venv/bin/python benchmarks/env_speed.py [--repeats 7] [--breakdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pybullet
import pybullet_data

from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams

GOAL_RATIO = 0.5  # the env must keep at least this fraction of the bare physics rate


def bare_pybullet(setup, physics_steps: int, seed: int) -> float:
    """Physics steps/s of a plain torque-control loop on the same URDF."""
    client = pybullet.connect(pybullet.DIRECT)
    try:
        pybullet.setGravity(0.0, 0.0, -9.81, physicsClientId=client)
        pybullet.setTimeStep(1.0 / setup.config.sim_rate_hz, physicsClientId=client)
        urdf = Path(pybullet_data.getDataPath()) / setup.robot.urdf
        body = pybullet.loadURDF(str(urdf), useFixedBase=True, physicsClientId=client)
        names = {
            pybullet.getJointInfo(body, i, physicsClientId=client)[1].decode(): i
            for i in range(pybullet.getNumJoints(body, physicsClientId=client))
        }
        joints = [names[name] for name in setup.robot.joint_names]
        pybullet.setJointMotorControlArray(
            body, joints, pybullet.VELOCITY_CONTROL, forces=[0.0] * len(joints),
            physicsClientId=client,
        )
        for j, q in zip(joints, setup.robot.default_pose):
            pybullet.resetJointState(body, j, q, 0.0, physicsClientId=client)
        rng = np.random.default_rng(seed)
        scale = np.asarray(setup.robot.action_scale)
        torques = (rng.uniform(-1.0, 1.0, (physics_steps, len(joints))) * scale).tolist()
        start = time.perf_counter()
        for forces in torques:
            pybullet.setJointMotorControlArray(
                body, joints, pybullet.TORQUE_CONTROL, forces=forces, physicsClientId=client
            )
            pybullet.stepSimulation(physicsClientId=client)
            pybullet.getJointStates(body, joints, physicsClientId=client)
        elapsed = time.perf_counter() - start
    finally:
        pybullet.disconnect(client)
    return physics_steps / elapsed


def env_steps(env: ArmTrackingEnv, steps: int, seed: int) -> float:
    """Env steps/s of ``env.step`` with uniform random actions (resets not timed)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1.0, 1.0, (steps, env.action_space.shape[0])).astype(np.float32)
    env.reset(seed=seed)
    elapsed = 0.0
    done = 0
    while done < steps:
        start = time.perf_counter()
        for action in actions[done:]:
            _, _, terminated, truncated, _ = env.step(action)
            done += 1
            if terminated or truncated:
                break
        elapsed += time.perf_counter() - start
        if done < steps:
            env.reset()
    return steps / elapsed


def sim_steps(env: ArmTrackingEnv, steps: int, seed: int) -> float:
    """Physics steps/s of the env's ``ArmSimulation.step`` alone (same commands, same
    episode length and resets as :func:`env_steps`, without the env's Python layer)."""
    rng = np.random.default_rng(seed)
    scale = np.asarray(env.setup.robot.action_scale)
    commands = rng.uniform(-1.0, 1.0, (steps, env.action_space.shape[0])) * scale
    substeps, episode = env.setup.substeps, env.setup.episode_steps
    elapsed = 0.0
    for first in range(0, steps, episode):
        env.reset(seed=seed + first)
        start = time.perf_counter()
        for command in commands[first:first + episode]:
            env.sim.step(command, substeps=substeps)
        elapsed += time.perf_counter() - start
    return steps * substeps / elapsed


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bare-steps", type=int, default=20000, help="physics steps per run")
    parser.add_argument("--env-steps", type=int, default=4000, help="env steps per run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time payload, friction, damping and delay one at a time")
    args = parser.parse_args(argv)

    setup = load_env_setup()
    substeps = setup.substeps
    robot = setup.robot
    faulty = TaskParams(
        payload_mass=2.0,
        payload_offset=(0.0, 0.0, 0.05),
        coulomb_friction=tuple(0.75 * s for s in robot.friction_scale),
        viscous_damping=tuple(0.25 * s for s in robot.friction_scale),
        actuator_delay_s=0.004,
    )
    tasks = {"intact": TaskParams(), "payload+friction+delay": faulty}
    if args.breakdown:
        tasks.update({
            "payload only": TaskParams(payload_mass=faulty.payload_mass,
                                       payload_offset=faulty.payload_offset),
            "coulomb friction only": TaskParams(coulomb_friction=faulty.coulomb_friction),
            "viscous damping only": TaskParams(viscous_damping=faulty.viscous_damping),
            "delay only": TaskParams(actuator_delay_s=faulty.actuator_delay_s),
        })
    envs = {name: ArmTrackingEnv(setup, task=task) for name, task in tasks.items()}
    load_before = os.getloadavg()

    bare: list[float] = []
    env_rates: dict[str, list[float]] = {name: [] for name in tasks}
    sim_rates: dict[str, list[float]] = {name: [] for name in tasks}
    for repeat in range(args.repeats):  # interleaved, so slow drifts in load hit all alike
        bare.append(bare_pybullet(setup, args.bare_steps, seed=repeat))
        for name, env in envs.items():
            env_rates[name].append(env_steps(env, args.env_steps, seed=repeat))
            sim_rates[name].append(sim_steps(env, args.env_steps, seed=repeat))
    for env in envs.values():
        env.close()
    load_after = os.getloadavg()

    bare_median = statistics.median(bare)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pybullet": importlib.metadata.version("pybullet"),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "config": {
            "sim_rate_hz": setup.config.sim_rate_hz,
            "control_rate_hz": setup.config.control_rate_hz,
            "substeps": substeps,
            "repeats": args.repeats,
            "bare_physics_steps_per_run": args.bare_steps,
            "env_steps_per_run": args.env_steps,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "bare_physics_steps_per_s": summary(bare),
        "env": {},
        "goal_ratio": GOAL_RATIO,
    }
    rows = [("bare PyBullet loop", "-", bare_median, min(bare), max(bare), 1.0, "-")]
    for name, rates in env_rates.items():
        med = statistics.median(rates)
        physics = [r * substeps for r in rates]
        ratio = med * substeps / bare_median
        results["env"][name] = {
            "env_steps_per_s": summary(rates),
            "physics_steps_per_s": summary(physics),
            "ratio_to_bare": ratio,
            "goal_met": ratio >= GOAL_RATIO,
            "sim_step_only_physics_steps_per_s": summary(sim_rates[name]),
        }
        rows.append((f"env, {name}", f"{med:,.0f}", med * substeps, min(physics), max(physics),
                     ratio, f"{statistics.median(sim_rates[name]):,.0f}"))

    m = results["machine"]
    print(f"{m['cpus']} CPUs, Python {m['python']}, pybullet {m['pybullet']}, "
          f"load avg before {load_before[0]:.2f} after {load_after[0]:.2f}; "
          f"{args.repeats} repeats, median (min-max); {substeps} physics steps per env step")
    header = (f"{'loop':<30} {'env steps/s':>11} {'physics steps/s (min-max)':>28} "
              f"{'vs bare':>7} {'sim.step only':>13}")
    print(header)
    print("-" * len(header))
    for label, env_rate, physics, low, high, ratio, sim_only in rows:
        spread = f"{physics:,.0f} ({low:,.0f}-{high:,.0f})"
        print(f"{label:<30} {env_rate:>11} {spread:>28} {ratio:>7.0%} {sim_only:>13}")
    print("sim.step only: physics steps/s of ArmSimulation.step(command, substeps) alone, "
          "without the env's Python layer")
    worst = min(v["ratio_to_bare"] for v in results["env"].values())
    verdict = "met" if worst >= GOAL_RATIO else "NOT met"
    print(f"goal: env keeps >= {GOAL_RATIO:.0%} of the bare rate -> {verdict} (worst {worst:.0%})")
    results["tasks"] = {name: task.to_dict() for name, task in tasks.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
