#!/usr/bin/env python3
"""Benchmark: what running evaluation episodes as Ray tasks costs on top of running them inline.

Measures, in one process (docs/SCALING.md):

(a) starting a local Ray instance (``ray_session``: loopback, no dashboard);
(b) the round trip of a trivial task (``abs``) through ``run_episodes_ray`` with 1 worker: the
    per-job cost of Ray itself;
(c) the jobs of ``metarl eval`` for one method (the shipped ``pearl`` model, ``--episodes``
    held-out episodes in chunks of 8) as Ray tasks on 1 worker once cold (the worker's
    imports and model loading), then ``--repeats`` times inline and on the warm worker,
    alternating. ``(best Ray - best inline) / episodes`` is Ray's overhead per episode.

Wall times (``time.perf_counter``) and this process's CPU time; the machine may be shared, so
the script prints the load average around each part.

    .venv/bin/python benchmarks/ray_overhead.py [--episodes 48] [--tasks 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

from metarl_ros.core.resources import share_directory
from metarl_ros.distributed.episodes import run_episodes_ray
from metarl_ros.distributed.runtime import ray_session
from metarl_ros.evaluation import evaluate
from metarl_ros.evaluation.methods import METHODS, find_model_runs
from metarl_ros.evaluation.parallel import run_episodes
from metarl_ros.evaluation.runner import make_jobs, run_job
from metarl_ros.sim.env_config import load_env_setup


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def timed(label: str, call) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    call()
    wall = time.perf_counter() - start
    print(f"{label:<44} {wall:8.2f} s wall {time.process_time() - cpu:7.2f} s CPU here  "
          f"(load {load()})", flush=True)
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models = share_directory() / "models"
    run = find_model_runs([models])[0]
    env_config = share_directory() / "sim/envs/iiwa7_tracking.yaml"
    setup = load_env_setup(env_config)
    episodes = evaluate.split_set(setup, "heldout", args.episodes, 0).episodes
    jobs = make_jobs(METHODS["pearl"], 0, run.models, env_config, episodes)
    print(f"{len(jobs)} jobs of up to 8 episodes, {args.episodes} episodes, method pearl")

    timed("inline, cold (loads the model)", lambda: run_episodes(run_job, jobs[:1], 1))
    session = ray_session("benchmark", num_cpus=1)
    timed("Ray start (local, loopback)", session.__enter__)
    inline, warm = [], []
    try:
        timed(f"{args.tasks} trivial tasks, 1 worker, cold",
              lambda: run_episodes_ray(abs, list(range(args.tasks)), 1))
        trivial = timed(f"{args.tasks} trivial tasks, 1 worker, warm",
                        lambda: run_episodes_ray(abs, list(range(args.tasks)), 1))
        timed("Ray, 1 worker, cold (imports, model)", lambda: run_episodes_ray(run_job, jobs, 1))
        for _ in range(args.repeats):  # alternating, against drifting load
            inline.append(timed("inline, warm", lambda: run_episodes(run_job, jobs, 1)))
            warm.append(timed("Ray, 1 worker, warm", lambda: run_episodes_ray(run_job, jobs, 1)))
    finally:
        session.__exit__(None, None, None)
    best_inline, best_warm = min(inline), min(warm)
    print(f"per trivial task: {1000 * trivial / args.tasks:.2f} ms; best of {args.repeats}: "
          f"inline {1000 * best_inline / args.episodes:.1f} ms per episode, Ray "
          f"{1000 * best_warm / args.episodes:.1f} ms: overhead "
          f"{1000 * (best_warm - best_inline) / args.episodes:+.1f} ms per episode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
