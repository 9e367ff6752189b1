"""Choose the parameter adaptation's gains on the validation draw.

    python benchmarks/parameter_adaptation_gains.py --model models --gains 5000 \\
        --rate-limits 3,5,10 --json runs/padapt/gains.json

Registers ``pearl_adapt`` and ``adaptive_ff`` (:mod:`metarl_ros.policy.parameter_adaptation`)
once per gain combination, runs ``metarl eval --draw validation`` on them (the report draw is
never read), and prints per method the geometric mean of the post-fault RMS error (mrad) over
the in-range conditions of the suites except locked joints (the criterion of
``benchmarks/choose_seeds.py``), the worst ratio to nominal over every condition (an adaptive
law must never make things worse), and the intact arm's error before the faults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import defaultdict

from metarl_ros.cli.main import main as metarl
from metarl_ros.evaluation.methods import LearnedMethod, PolicyMethod, register
from metarl_ros.policy.parameter_adaptation import ParameterAdaptationConfig


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The validation run's options, shared with ``benchmarks/maml_gates.py``."""
    parser.add_argument("--model", default="models")
    parser.add_argument("--suite", default="all")
    parser.add_argument("--tasks-per-condition", default="2")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--json", required=True)


def run_validation(args: argparse.Namespace, methods: list[str]) -> None:
    """``metarl eval --draw validation`` of ``methods`` beside ``pearl``; then the summary."""
    metarl(["eval", "--model", args.model, "--suite", args.suite, "--draw", "validation",
            "--tasks-per-condition", args.tasks_per_condition, "--workers", args.workers,
            "--methods", ",".join(["pearl", *methods]), "--json", args.json])
    summarize(args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    parser.add_argument("--gains", type=floats, default=[5000.0])
    parser.add_argument("--leaks", type=floats, default=[0.05])
    parser.add_argument("--rate-limits", type=floats, default=[5.0])
    parser.add_argument("--error-limits", type=floats, default=[0.2])
    parser.add_argument("--which", default="pearl_adapt,adaptive_ff")
    args = parser.parse_args()
    names = []
    for gain, rate, leak, limit in itertools.product(args.gains, args.rate_limits, args.leaks,
                                                      args.error_limits):
        config = ParameterAdaptationConfig(gain=gain, rate_limit=rate, leak=leak,
                                           error_limit=limit)
        tag = f"g{gain:g}_r{rate:g}_l{leak:g}_e{limit:g}"
        if "pearl_adapt" in args.which:
            register(LearnedMethod(f"pearl_adapt_{tag}", "pearl", parameter_adaptation=config))
            names.append(f"pearl_adapt_{tag}")
        if "adaptive_ff" in args.which:
            register(PolicyMethod(
                f"adaptive_ff_{tag}",
                "metarl_ros.policy.factory:adaptive_feed_forward_policy",
                (("config", config),)))
            names.append(f"adaptive_ff_{tag}")
    run_validation(args, names)


def summarize(path: str) -> None:
    data = json.loads(open(path, encoding="utf-8").read())
    logs: dict[str, list[float]] = defaultdict(list)
    worst: dict[str, tuple[float, str]] = {}
    intact: dict[str, list[float]] = defaultdict(list)
    for suite, result in data["results"]["validation"].items():
        for name, condition in result["conditions"].items():
            methods = condition["methods"]
            base = methods["nominal"]["post_rms_mrad"]["mean"]
            for method, values in methods.items():
                post = values["post_rms_mrad"]["mean"]
                if suite != "locked_joint" and condition["scope"] == "in_range":
                    logs[method].append(math.log(post))
                ratio = post / base
                if method not in worst or ratio > worst[method][0]:
                    worst[method] = (ratio, f"{suite}/{name}")
                pre = values.get("pre_rms_mrad", {}).get("mean")
                if pre is not None:
                    intact[method].append(pre)
    for method in sorted(logs, key=lambda m: sum(logs[m]) / len(logs[m])):
        geo = math.exp(sum(logs[method]) / len(logs[method]))
        ratio, where = worst[method]
        pre = sum(intact[method]) / max(1, len(intact[method]))
        print(f"{method:40s} in-range geomean {geo:6.2f} mrad, worst vs nominal {ratio:5.2f}x "
              f"({where}), intact before faults {pre:5.2f} mrad")


if __name__ == "__main__":
    main()
