"""Paired comparison of models or of MAML correction settings on the same fault episodes.

`metarl eval` scores methods against each other within one model directory. Choosing between
two training recipes or two deployment settings needs the same episodes run twice and the
difference taken per episode: the post-fault return varies far more between episodes than
between close variants, and a paired difference removes that variance.

    # the same methods from two model directories (new - old), 30 episodes of seed 1
    python benchmarks/paired_eval.py models runs/recipe/final --split heldout \
        --episodes 30 --seed 1 --methods oracle,robust,pearl,maml,pearl_maml

    # MAML correction settings (evidence threshold, bound[, lag band in rad or off]),
    # against the policy without it
    python benchmarks/paired_eval.py models --split ood --episodes 30 --seed 1 \
        --correction 0.6,0.1,off --correction 0.6,0.1,0.005

Prints, per method, the mean paired difference of post-fault and of pre-fault return per
episode with its standard error, the post-fault RMS tracking error of each side and the
tracking error before the fault.
Settings chosen with it should be reported on another seed (`metarl eval` uses seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metarl_ros.evaluation import evaluate as evaluation
from metarl_ros.policy import dynamics_adaptation as runtime


def _returns(model_root: Path, split: str, episodes: int, seed: int, methods: tuple[str, ...]
             ) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(summary, {method: post-fault return per episode}, {method: pre-fault return per
    episode})``, each array (episodes,)."""
    summary, runs, plan, setup = evaluation.evaluate(model_root, split, episodes, seed,
                                                     methods=methods)
    steps = evaluation.fault_steps_of(plan, setup.control_dt)
    post = {m: evaluation.post_per_episode(runs[m], steps) for m in summary}
    pre = {m: runs[m].reward.sum(axis=1) - post[m] for m in summary}
    return summary, post, pre


def _post_fault_returns(model_root: Path, split: str, episodes: int, seed: int,
                        methods: tuple[str, ...]) -> tuple[dict, dict[str, np.ndarray]]:
    """``(summary, {method: post-fault return per episode, (episodes,)})``."""
    summary, post, _ = _returns(model_root, split, episodes, seed, methods)
    return summary, post


def _paired(new: np.ndarray, old: np.ndarray) -> str:
    diff = new - old
    return f"{diff.mean():+.2f} ± {diff.std(ddof=1) / np.sqrt(diff.size):.2f} per episode"


def compare_models(old: Path, new: Path, split: str, episodes: int, seed: int,
                   methods: tuple[str, ...]) -> None:
    old_summary, old_returns, old_pre = _returns(old, split, episodes, seed, methods)
    new_summary, new_returns, new_pre = _returns(new, split, episodes, seed, methods)
    for method in methods:
        a, b = old_summary[method], new_summary[method]
        before = "tracking_error_before_mean"
        print(f"{split} seed {seed} {method}: {new} - {old} post-fault return "
              f"{_paired(new_returns[method], old_returns[method])}; pre-fault return "
              f"{_paired(new_pre[method], old_pre[method])}; post-fault RMS error "
              f"{a['post_rms_mrad']:.2f} -> {b['post_rms_mrad']:.2f} mrad; error before "
              f"{a[before]:.4f} -> {b[before]:.4f} rad", flush=True)


def compare_corrections(root: Path, split: str, episodes: int, seed: int,
                        settings: list[tuple[float, float, float | None]]) -> None:
    """Each (min_improvement, max_correction, lag_band_rad) setting: the corrected methods
    against the same policies without correction, on the same episodes."""
    base_methods = ("oracle", "nominal", "robust", "pearl")
    _, base = _post_fault_returns(root, split, episodes, seed, base_methods)
    gap = base["oracle"].sum() - base["nominal"].sum()
    for min_improvement, max_correction, lag_band_rad in settings:
        runtime.STRUCTURED_DEFAULTS.update(min_improvement=min_improvement,
                                           max_correction=max_correction,
                                           lag_band_rad=lag_band_rad)
        _, corrected = _post_fault_returns(root, split, episodes, seed, ("maml", "pearl_maml"))
        parts = []
        for method, policy in (("maml", "robust"), ("pearl_maml", "pearl")):
            diff = corrected[method] - base[policy]
            parts.append(f"{method} - {policy}: {_paired(corrected[method], base[policy])} "
                         f"({diff.sum() / gap:+.3f} normalized)")
        print(f"{split} seed {seed} min_improvement {min_improvement} max_correction "
              f"{max_correction} lag_band_rad {lag_band_rad}: " + " | ".join(parts), flush=True)


def _setting(text: str) -> tuple[float, float, float | None]:
    """``MIN_IMPROVEMENT,MAX_CORRECTION[,LAG_BAND_RAD]``; the band is the shipped default when
    left out, and ``off`` turns the lag gate off."""
    values = text.split(",")
    try:
        if len(values) not in (2, 3):
            raise ValueError
        min_improvement, max_correction = float(values[0]), float(values[1])
        band = runtime.STRUCTURED_DEFAULTS["lag_band_rad"]
        if len(values) == 3:
            band = None if values[2] == "off" else float(values[2])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected MIN_IMPROVEMENT,MAX_CORRECTION[,LAG_BAND_RAD|off]") from None
    return min_improvement, max_correction, band


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="model directory (oracle/, robust/, ...)")
    parser.add_argument("new_models", type=Path, nargs="?",
                        help="second model directory: compare its methods with the first's")
    parser.add_argument("--split", default="heldout", choices=("train", "heldout", "ood"))
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default="robust,pearl,maml,pearl_maml")
    parser.add_argument("--correction", type=_setting, action="append", default=[],
                        metavar="MIN_IMPROVEMENT,MAX_CORRECTION[,LAG_BAND_RAD|off]",
                        help="MAML correction setting to try (repeat for several)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if (args.new_models is None) == (not args.correction):
        parser.error("give either a second model directory or --correction settings")
    if args.new_models is not None:
        compare_models(args.models, args.new_models, args.split, args.episodes, args.seed,
                       tuple(args.methods.split(",")))
    else:
        compare_corrections(args.models, args.split, args.episodes, args.seed, args.correction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
