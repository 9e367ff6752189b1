"""The MAML correction against a deliberately bad dynamics model (shipped PEARL model).

The correction acts when the adapted head predicts the newest data better than the reference
head. A model whose error depends on the state passes that test without any fault: a head
fitted to recent data always predicts recent data better. Here the shipped latent dynamics
model's drift head is corrupted with noise, which makes exactly such a model, and the arm runs
intact until each episode's fault. Without the lag gate its correction costs return on the
intact arm (the premise, asserted); with it, PEARL + correction stays level with PEARL alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from metarl_ros.core.resources import share_directory
from metarl_ros.evaluation import evaluate as evaluation
from metarl_ros.learning.rollout import VectorRollout
from metarl_ros.policy import dynamics_adaptation as runtime
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import fault_episodes, make_split

torch.set_num_threads(1)

MODELS = share_directory() / "models"
EPISODES = 4


def _corrupted(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with ``noise`` times the weights' spread added to its drift head."""
    bad = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = bad.drift.weight
        weight.add_(noise * weight.std() * torch.randn(weight.shape, generator=g))
    return bad


def _returns(run: evaluation.MethodRun, fault_steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per episode: return before the fault, return from it; each (episodes,)."""
    pre = np.array([run.reward[i, :s].sum() for i, s in enumerate(fault_steps)])
    return pre, evaluation.post_per_episode(run, fault_steps)


@pytest.mark.skipif(not (MODELS / "pearl" / "model.pt").is_file(), reason="no shipped model")
def test_lag_gate_keeps_a_bad_dynamics_model_from_costing_return(monkeypatch) -> None:
    models = evaluation.load_method_models(MODELS, ["pearl", "pearl_maml"])
    pearl = models["pearl"]
    setup = load_env_setup(evaluation.model_env_config(pearl.payload, pearl.path))
    tasks = make_split(setup.tasks, "heldout", setup.robot.friction_scale)
    plan = fault_episodes(setup.tasks, tasks, EPISODES, 1)
    fault_steps = evaluation.fault_steps_of(plan, setup.control_dt)
    window = evaluation.context_window(models)
    rollout = VectorRollout(setup, EPISODES)
    try:
        pre_alone, post_alone = _returns(
            evaluation.run_method("pearl", models, setup, plan, rollout, window), fault_steps
        )
        pearl.dynamics["dynamics_latent"] = _corrupted(
            pearl.dynamics["dynamics_latent"], noise=1.0, seed=0
        )
        shipped_band = runtime.STRUCTURED_DEFAULTS["lag_band_rad"]
        results = {}
        for band in (None, shipped_band):
            monkeypatch.setitem(runtime.STRUCTURED_DEFAULTS, "lag_band_rad", band)
            run = evaluation.run_method("pearl_maml", models, setup, plan, rollout, window)
            results[band] = _returns(run, fault_steps)
    finally:
        rollout.close()
    pre_off, _ = results[None]
    pre_on, post_on = results[shipped_band]
    # the premise: ungated, the bad model's correction acts on the intact arm and costs return
    assert (pre_off - pre_alone).mean() < -5.0, (pre_off - pre_alone)
    # gated: level with PEARL alone before the fault and after it
    assert (pre_on - pre_alone).mean() > -1.0, (pre_on - pre_alone)
    assert (post_on - post_alone).mean() > -2.0, (post_on - post_alone)


class _Recorder:
    """A step hook that records what the rollout hands its ``correct``, and changes nothing."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def correct(self, obs, action, latent):
        self.seen.append(np.array(obs))
        return action

    def record(self, obs, action, next_obs, latent) -> None:
        pass


@pytest.mark.skipif(not (MODELS / "pearl" / "model.pt").is_file(), reason="no shipped model")
def test_the_correction_sees_the_measured_state_not_the_actors_view() -> None:
    """The shipped actor sees the reference view (tracking error zero); the correction must
    get the whole observation: it scales the torque the PD feedback on that error is part of,
    and its lag gate averages that error (on the view the gate could never open)."""
    models = evaluation.load_method_models(MODELS, ["pearl"])
    pearl = models["pearl"]
    assert pearl.agent.spec.actor_view == "reference"  # the premise
    setup = load_env_setup(evaluation.model_env_config(pearl.payload, pearl.path))
    tasks = make_split(setup.tasks, "heldout", setup.robot.friction_scale)[:1]
    rollout = VectorRollout(setup, 1)
    hook = _Recorder()
    try:
        result = rollout.run(pearl.agent, tasks, [0], deterministic=True, latent_mode="mean",
                             hook=hook, steps=30)
    finally:
        rollout.close()
    seen = np.stack(hook.seen, axis=1)  # (1, steps, obs_dim)
    np.testing.assert_array_equal(seen, result.obs)
    n = setup.act_dim
    assert np.abs(seen[..., 2 * n:3 * n]).max() > 0.0  # a tracking error to gate on
