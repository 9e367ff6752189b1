"""Markdown tables of a ``metarl eval --suite`` JSON (the tables in README and BENCHMARKS).

    python benchmarks/eval_markdown.py docs/results/eval_suites.json --draw report

Per suite and condition: post-fault RMS tracking error (mrad, mean and 95 % interval over
tasks and episodes) of every method, the headroom nominal / ceiling, and then per method the
fraction of episodes that recover and the gap closed (log error between nominal and the
ceiling; "--" where the headroom is within noise), and the push test's stiffness.
"""

from __future__ import annotations

import argparse
import json
import math


def _cell(stat: dict) -> str:
    low, high = stat["ci95"]
    return f"{stat['mean']:.1f} [{low:.1f}, {high:.1f}]"


def error_table(draw: dict, methods: list[str]) -> list[str]:
    lines = ["| suite / condition | " + " | ".join(methods) + " | nominal / ceiling |",
             "| --- |" + " --- |" * (len(methods) + 1)]
    for suite, entry in draw.items():
        for condition, c in entry["conditions"].items():
            cells = [_cell(c["methods"][m]["post_rms_mrad"]) if m in c["methods"] else "--"
                     for m in methods]
            head = c["headroom"]["ln_nominal_over_ceiling"]["mean"]
            ratio = f"{math.exp(head):.1f}x" + ("" if c["headroom"]["clear_of_noise"]
                                                else " (noise)")
            lines.append(f"| {suite} / {condition} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def adaptation_table(draw: dict, methods: list[str]) -> list[str]:
    lines = ["| suite / condition | " + " | ".join(methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    for suite, entry in draw.items():
        for condition, c in entry["conditions"].items():
            cells = []
            for m in methods:
                s = c["methods"].get(m)
                if s is None:
                    cells.append("--")
                    continue
                recovered = s["recovery"]["recovered_fraction"]["mean"]
                gap = s["gap_closed"]["value"]
                gap_text = "--" if gap is None else f"{gap:+.2f}"
                cells.append(f"{recovered:.0%} / {gap_text}")
            lines.append(f"| {suite} / {condition} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--draw", default="report")
    args = parser.parse_args()
    data = json.load(open(args.json))
    methods = data["protocol"]["methods"]
    draw = data["results"][args.draw]
    print(f"Post-fault RMS tracking error, mrad [95 %], {args.draw} draw\n")
    print("\n".join(error_table(draw, methods)))
    print("\nRecovered episodes / gap closed (1 = the ceiling, 0 = nominal, -- = no headroom)\n")
    print("\n".join(adaptation_table(draw, methods)))
    print("\nPush test (20 N down for 0.3 s, intact arm): stiffness at the flange, N/mm\n")
    print("| " + " | ".join(methods) + " |")
    print("|" + " --- |" * len(methods))
    print("| " + " | ".join(
        f"{data['compliance'][m]['stiffness_n_per_mm']:.2f}"
        if "stiffness_n_per_mm" in data["compliance"][m] else "--" for m in methods) + " |")


if __name__ == "__main__":
    main()
