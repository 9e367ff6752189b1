"""Which training run (seed) of each method ships: the choice, made on the validation draw.

    metarl eval --model runs/model2/set1 runs/model2/set2 runs/model2/set3 --suite all \\
        --draw validation --tasks-per-condition 4 --workers 2 --json runs/model2/validation.json
    python benchmarks/choose_seeds.py runs/model2/validation.json

The criterion: the geometric mean, over every in-range condition of the suites except locked
joints (which no method can recover in joint space), of the run's post-fault RMS tracking
error (mrad) -- the log error the evaluation's gap is measured in. Prints each run's value per
method and the chosen run; the report draw is not read.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="metarl eval --json output with the validation draw")
    args = parser.parse_args()
    data = json.loads(open(args.json, encoding="utf-8").read())
    if "validation" not in data["results"]:
        raise SystemExit(f"{args.json}: no validation draw (run metarl eval --draw validation)")
    runs = [run["path"] for run in data["protocol"]["model_runs"]]
    logs: dict[str, list[list[float]]] = defaultdict(lambda: [[] for _ in runs])
    for suite, result in data["results"]["validation"].items():
        if suite == "locked_joint":
            continue
        for name, condition in result["conditions"].items():
            if condition["scope"] != "in_range":
                continue
            for method, values in condition["methods"].items():
                per_run = values["post_rms_mrad"].get("per_run")
                if not per_run or len(per_run) != len(runs):
                    continue
                for k, value in enumerate(per_run):
                    logs[method][k].append(math.log(value))
    for method, per_run in sorted(logs.items()):
        means = [math.exp(sum(v) / len(v)) for v in per_run]
        best = min(range(len(runs)), key=means.__getitem__)
        table = ", ".join(f"{run}: {m:.2f}" for run, m in zip(runs, means))
        print(f"{method}: geometric mean post-fault mrad over in-range conditions "
              f"({len(per_run[0])}): {table} -> ship {runs[best]}")


if __name__ == "__main__":
    main()
