"""Push test of each controller: peak flange deflection under 20 N pushed down for 0.3 s.

    python benchmarks/compliance.py [--models models] [--env sim/envs/iiwa7_tracking.yaml]

A controller that absorbs faults by stiffening shows here as a small deflection: compare
controllers at equal compliance (metarl_ros/evaluation/compliance.py). Every evaluation method
is tested as ``metarl eval`` tests it (``method_compliance``: learned models with their context
posterior, without the MAML correction), plus ``pd``, the env's PD alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metarl_ros.evaluation.compliance import method_compliance
from metarl_ros.evaluation.methods import METHODS
from metarl_ros.sim.env_config import load_env_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="folder of <method>/model.pt")
    parser.add_argument("--env", default="sim/envs/iiwa7_tracking.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="references (episodes) per method")
    args = parser.parse_args()
    setup = load_env_setup(args.env)
    models = {p.parent.name: p for p in sorted(Path(args.models).glob("*/model.pt"))}
    print(f"{'controller':12s} {'peak deflection [mm]':>22s} {'stiffness [N/mm]':>17s}")
    for name, spec in METHODS.items():
        result = method_compliance(spec, models, setup, seeds=args.seeds)
        if "peak_deflection_mm" not in result:
            print(f"{name:12s} {result['status']}")
            continue
        print(f"{name:12s} {result['peak_deflection_mm']:22.2f} "
              f"{result['stiffness_n_per_mm']:17.2f}")


if __name__ == "__main__":
    main()
