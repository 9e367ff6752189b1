"""Choose the MAML correction's evidence and lag gates on the validation draw.

    python benchmarks/maml_gates.py --min-improvements 0.0,0.1 --lag-bands none,0.002,0.0005 \\
        --json runs/maml_gates.json

Registers ``pearl_maml`` once per gate combination (``min_improvement``: relative held-out
improvement that counts as evidence; ``lag_band_rad``: the joint lag at which the lag gate
passes the whole correction, ``none`` = no lag gate; :mod:`metarl_ros.policy.dynamics_adaptation`),
runs ``metarl eval --draw validation`` on them beside ``pearl`` (the report draw is never read)
and prints the criterion of ``benchmarks/parameter_adaptation_gains.py``.
"""

from __future__ import annotations

import argparse
import itertools

from metarl_ros.evaluation.methods import LearnedMethod, register

from parameter_adaptation_gains import add_eval_arguments, floats, run_validation


def bands(text: str) -> list[float | None]:
    return [None if v == "none" else float(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    parser.add_argument("--min-improvements", type=floats, default=[0.0, 0.1])
    parser.add_argument("--lag-bands", type=bands, default=[None, 0.002])
    args = parser.parse_args()
    names = []
    for improvement, band in itertools.product(args.min_improvements, args.lag_bands):
        name = f"pearl_maml_i{improvement:g}_b{band if band is not None else 'none'}"
        register(LearnedMethod(name, "pearl", maml=True, maml_options=(
            ("min_improvement", improvement), ("lag_band_rad", band))))
        names.append(name)
    run_validation(args, names)


if __name__ == "__main__":
    main()
