"""Does the parameter adaptation stay put over long episodes? (Evaluation episodes last 4 s.)

    python benchmarks/adaptation_long_horizon.py --seconds 15 --seeds 3,4

Runs the env's own controller (``pd``) and the adaptive feed-forward (``adaptive_ff``:
:mod:`metarl_ros.policy.parameter_adaptation` with its shipped gains, or ``--rate-limit``) on
the compliant iiwa with a fault present from the start (a 2 kg payload, weak shoulder and
elbow, Coulomb friction) and on the intact arm, and prints the mean tracking error (mrad) in
five equal segments of the episode: an adaptive law that drifts or oscillates shows a rising
tail.
"""

from __future__ import annotations

import argparse

import numpy as np

from metarl_ros.evaluation.episode import policy_steps
from metarl_ros.policy.factory import adaptive_feed_forward_policy, make_policy
from metarl_ros.policy.parameter_adaptation import ParameterAdaptationConfig
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams

N = 7
TASKS = {
    "intact": TaskParams(),
    "payload 2 kg": TaskParams(payload_mass=2.0, payload_offset=(0.0, 0.0, 0.05)),
    "weak shoulder+elbow": TaskParams(motor_strength=(1.0, 0.5, 1.0, 0.6, 1.0, 1.0, 1.0)),
    "Coulomb 0.8 N*m": TaskParams(coulomb_friction=(0.8,) * N),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="sim/envs/iiwa7_compliant.yaml")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--seeds", default="3")
    parser.add_argument("--gain", type=float, default=None)
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="1e9: effectively the law without its normalization")
    args = parser.parse_args()
    setup = load_env_setup(args.env)
    steps = int(round(args.seconds / setup.control_dt))
    given = {"gain": args.gain, "rate_limit": args.rate_limit}
    config = ParameterAdaptationConfig(**{k: v for k, v in given.items() if v is not None})
    env = ArmTrackingEnv(setup)
    print(f"mean tracking error (mrad) in 5 segments of {args.seconds:g} s; gains {config}")
    for name, task in TASKS.items():
        for label, make in (("pd", lambda: make_policy("pd", setup)),
                            ("adaptive_ff", lambda: adaptive_feed_forward_policy(setup, config))):
            rows = []
            for seed in (int(s) for s in args.seeds.split(",")):
                policy = make()
                obs, _ = env.reset(seed=seed, options={"task": task, "faults": []})
                policy.reset()
                error = [step.info["tracking_error"]
                         for step in policy_steps(env, policy, obs, steps)]
                rows.append([segment.mean() * 1e3 for segment in np.array_split(error, 5)])
            means = np.mean(rows, axis=0)
            print(f"{name:22s} {label:12s} " + " ".join(f"{m:7.1f}" for m in means))
    env.close()


if __name__ == "__main__":
    main()
