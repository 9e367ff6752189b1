"""Push test of each controller: peak flange deflection under 20 N pushed down for 0.3 s.

    python benchmarks/compliance.py [--models models] [--env sim/envs/iiwa7_tracking.yaml]

A controller that absorbs faults by stiffening shows here as a small deflection: compare
controllers at equal compliance (metarl_ros/evaluation/compliance.py). Learned models run
with their context posterior and without the MAML correction; ``pd`` is the env's PD alone,
``ceiling`` the true model's feed-forward on the same PD.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from metarl_ros.evaluation.compliance import push_test
from metarl_ros.learning.saved_model import load_model
from metarl_ros.policy.computed_torque import computed_torque_policy
from metarl_ros.policy.factory import make_policy
from metarl_ros.policy.torch_policy import TorchAdaptivePolicy
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="folder of <method>/model.pt")
    parser.add_argument("--env", default="sim/envs/iiwa7_tracking.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="references (episodes) per method")
    args = parser.parse_args()
    setup = load_env_setup(args.env)
    env = ArmTrackingEnv(setup)
    makers = {"pd": lambda: None,
              "dob": lambda: make_policy("dob", setup),
              "adaptive_ct": lambda: make_policy("adaptive_ct", setup),
              "ceiling": lambda: computed_torque_policy(setup, lambda: env.true_task)}
    for model in sorted(Path(args.models).glob("*/model.pt")):
        if model.parent.name == "oracle":
            continue  # needs the true task online
        loaded = load_model(model)
        makers[model.parent.name] = (lambda loaded=loaded: TorchAdaptivePolicy(loaded))
    print(f"{'controller':12s} {'peak deflection [mm]':>22s} {'stiffness [N/mm]':>17s}")
    for name, make in makers.items():
        peaks = [push_test(env, make, seed=seed).peak_deflection_mm for seed in range(args.seeds)]
        peak = float(np.mean(peaks))
        print(f"{name:12s} {peak:22.2f} {20.0 / peak:17.2f}")
    env.close()


if __name__ == "__main__":
    main()
