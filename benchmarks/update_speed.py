"""Time one PEARL/SAC gradient update: the naive PEARL size vs the shipped config, same run.

    .venv/bin/python benchmarks/update_speed.py [--threads 1 2] [--repeats 30] [--json out.json]

"Naive" is the size the brief quotes (16 tasks x 256 samples, 256-wide MLPs, context of 100);
"shipped" is config/train_pearl.yaml (8 tasks x 128, 128-wide, context 25); "trailing" is the
same with ``context_sampling: trailing`` (each RL transition conditioned on its own window:
8 segments of 16 steps per task, each with the 25 transitions before it). All use the same
code (ConditionedSAC.update: encoder + twin critic + actor + temperature + Polyak), on random
data of the iiwa7 task's shapes (obs 49, action 7). Reports the median over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.encoder import TrailingContexts, trailing_windows
from metarl_ros.learning.transitions import TransitionBatch

OBS, ACT = 49, 7
SIZES = {
    "naive": dict(tasks=16, batch=256, context=100, hidden=(256, 256), encoder=(256, 256)),
    "shipped": dict(tasks=8, batch=128, context=25, hidden=(128, 128), encoder=(128, 128)),
    "trailing": dict(tasks=8, batch=128, context=25, hidden=(128, 128), encoder=(128, 128),
                     segments=8),
}


def time_update(size: dict, repeats: int) -> float:
    spec = AgentSpec(
        obs_dim=OBS,
        act_dim=ACT,
        actor_hidden=size["hidden"],
        critic_hidden=size["hidden"],
        encoder_hidden=size["encoder"],
    )
    agent = ConditionedSAC(spec)
    t, b = size["tasks"], size["batch"]
    batch = TransitionBatch(
        obs=torch.randn(t, b, OBS),
        action=torch.rand(t, b, ACT) * 2 - 1,
        reward=torch.randn(t, b),
        next_obs=torch.randn(t, b, OBS),
    )
    k = size["context"]
    context: torch.Tensor | TrailingContexts = torch.randn(t, k, spec.transition_dim)
    if "segments" in size:
        segments = size["segments"]
        length = k + b // segments
        episode_step = torch.arange(length).expand(t, segments, -1) + k  # windows all full
        context = TrailingContexts(
            torch.randn(t, segments, length, spec.transition_dim),
            *trailing_windows(episode_step, k),
        )
    for _ in range(3):
        agent.update(batch, context)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        agent.update(batch, context)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    print(f"{'size':10s}{'threads':>8s}{'ms/update':>12s}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, size in SIZES.items():
            ms = time_update(size, args.repeats)
            results[f"{name}/{threads}"] = ms
            print(f"{name:10s}{threads:8d}{ms:12.1f}")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
