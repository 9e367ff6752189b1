"""Run evaluation methods on one held-out fault episode with the shipped models (for tests
that check a node-side runner against what `metarl eval` does)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@dataclass
class EvaluatedEpisode:
    models_dir: Path
    setup: Any
    episode: Any
    actions: dict[str, np.ndarray]
    """per method, the applied actions (steps, act_dim)."""
    tracking_error: dict[str, np.ndarray]
    """per method, the tracking error (steps,), rad."""


def evaluate_one_episode(methods: list[str], seed: int) -> EvaluatedEpisode:
    """``methods`` of ``metarl eval`` on the first held-out fault episode drawn with ``seed``,
    with the shipped models (skips the test without them)."""
    from metarl_ros.core.resources import share_directory
    from metarl_ros.evaluation import evaluate as evaluation
    from metarl_ros.learning.rollout import VectorRollout
    from metarl_ros.sim.env_config import load_env_setup
    from metarl_ros.sim.tasks import fault_episodes, make_split

    models_dir = share_directory() / "models"
    if not (models_dir / "pearl" / "model.pt").is_file():
        pytest.skip("no shipped PEARL model")
    models = evaluation.load_method_models(models_dir, methods)
    setup = load_env_setup(evaluation.model_env_config(models["pearl"].payload,
                                                       models["pearl"].path))
    plan = fault_episodes(setup.tasks, make_split(setup.tasks, "heldout",
                                                  setup.robot.friction_scale), 1, seed)
    rollout = VectorRollout(setup, 1)
    try:
        runs = {name: evaluation.run_method(name, models, setup, plan[:1], rollout)
                for name in methods}
    finally:
        rollout.close()
    return EvaluatedEpisode(models_dir, setup, plan[0],
                            {name: run.action[0] for name, run in runs.items()},
                            {name: run.tracking_error[0] for name, run in runs.items()})
