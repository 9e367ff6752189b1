"""The push test measures the closed loop's compliance (metarl_ros.evaluation.compliance)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pybullet
import pytest

from metarl_ros.evaluation.compliance import push_test
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup

FORCE = np.array([0.0, 0.0, -20.0])


@pytest.fixture(scope="module")
def setup():
    # the PD arm alone, whose static compliance J K^-1 J^T F these tests check the push test
    # against (on iiwa7_compliant.yaml a doubled PD is not yet understood: issue #18's note)
    return load_env_setup("sim/envs/iiwa7_tracking.yaml")


def _static_deflection_mm(env: ArmTrackingEnv, kp: np.ndarray) -> float:
    """|J K^-1 J^T F| at the arm's current configuration: a spring's static answer."""
    sim = env.sim
    q = sim.true_state().position.tolist()
    zeros = [0.0] * len(q)
    linear, _ = pybullet.calculateJacobian(sim._body, sim._flange_id, [0.0, 0.0, 0.0], q,
                                           zeros, zeros, physicsClientId=sim._client)
    jac = np.asarray(linear)
    return float(np.linalg.norm(jac @ np.linalg.solve(np.diag(kp), jac.T @ FORCE)) * 1e3)


def test_a_held_push_deflects_the_pd_arm_like_its_spring(setup):
    env = ArmTrackingEnv(setup)
    result = push_test(env, lambda: None, seed=3, force_n=tuple(FORCE), duration_s=1.5,
                       observe_s=1.5)
    expected = _static_deflection_mm(env, np.asarray(setup.config.feedback.kp))
    settled = result.deflection_mm[-10:].mean()
    assert settled == pytest.approx(expected, rel=0.1)
    assert result.peak_deflection_mm >= settled
    assert result.stiffness_n_per_mm == pytest.approx(20.0 / result.peak_deflection_mm)


def test_twice_the_stiffness_halves_the_deflection(setup):
    config = setup.config
    stiff_config = config.model_copy(update={"feedback": config.feedback.model_copy(update={
        "kp": [2 * k for k in config.feedback.kp], "kd": [1.5 * k for k in config.feedback.kd]})})
    stiff = dataclasses.replace(setup, config=stiff_config)
    held = {"seed": 1, "duration_s": 1.5, "observe_s": 1.5}
    soft_mm = push_test(ArmTrackingEnv(setup), lambda: None, **held).deflection_mm[-10:].mean()
    stiff_mm = push_test(ArmTrackingEnv(stiff), lambda: None, **held).deflection_mm[-10:].mean()
    assert soft_mm / stiff_mm == pytest.approx(2.0, rel=0.15)


def test_without_a_push_the_two_runs_agree(setup, monkeypatch):
    env = ArmTrackingEnv(setup)
    monkeypatch.setattr(env.sim, "push", lambda *args: None)
    result = push_test(env, lambda: None, seed=2)
    assert result.peak_deflection_mm == 0.0


def test_bad_push_is_refused(setup):
    env = ArmTrackingEnv(setup)
    with pytest.raises(ValueError, match="non-zero force"):
        push_test(env, lambda: None, force_n=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="finite force"):
        env.sim.push(np.array([np.nan, 0.0, 0.0]), 0.0, 0.1)
