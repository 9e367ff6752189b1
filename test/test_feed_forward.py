"""The control law's optional model feed-forward (env ``feed_forward: nominal_model``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metarl_ros.control.law import effort_command
from metarl_ros.policy.computed_torque import ObservationCodec
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup


@pytest.fixture(scope="module")
def setups():
    plain = load_env_setup("sim/envs/iiwa7_tracking.yaml")  # the PD alone
    config = plain.config.model_copy(update={"feed_forward": "nominal_model"})
    return plain, dataclasses.replace(plain, config=config)


def _intact_rms_mrad(setup, steps=300) -> float:
    env = ArmTrackingEnv(setup)
    env.reset(seed=4)
    errors = [env.step(np.zeros(7, np.float32))[4]["tracking_error"] for _ in range(steps)]
    env.close()
    return float(np.sqrt(np.mean(np.square(errors[50:]))) * 1e3)


def test_the_feed_forward_is_the_arm_inverse_dynamics_without_gravity(setups):
    plain, model_based = setups
    law = model_based.law
    rng = np.random.default_rng(0)
    q, qd = rng.normal(size=7) * 0.3, rng.normal(size=7)
    ref = (q + 0.01, qd, rng.normal(size=7))
    action = rng.uniform(-1, 1, 7)
    added = effort_command(law, action, q, qd, ref) - effort_command(plain.law, action, q, qd, ref)
    model = law.feed_forward.model
    expected = model.inverse_dynamics(*ref) - model.gravity(ref[0])
    np.testing.assert_allclose(added, expected, atol=1e-9)
    assert np.abs(added).max() > 0.1
    # batched rows (offline retraining) give the same as one row at a time
    rows = effort_command(law, np.stack([action, action]), np.stack([q, q]),
                          np.stack([qd, qd]), tuple(np.stack([r, r]) for r in ref))
    np.testing.assert_allclose(rows[1], effort_command(law, action, q, qd, ref), atol=1e-12)


def test_model_feed_forward_tracks_the_intact_arm_far_better_than_the_pd(setups):
    plain, model_based = setups
    assert _intact_rms_mrad(model_based) < 0.2 * _intact_rms_mrad(plain)


def test_classical_controllers_see_the_feed_forward_as_part_of_the_env_effort(setups):
    _, model_based = setups
    codec = ObservationCodec.from_law(model_based.law)
    env = ArmTrackingEnv(model_based)
    obs, _ = env.reset(seed=1)
    q, qd, q_ref, qd_ref, qdd_ref = codec.decode(obs)
    expected = effort_command(model_based.law, np.zeros(7), q, qd, (q_ref, qd_ref, qdd_ref))
    np.testing.assert_allclose(codec.effort(np.zeros(7), obs), expected, rtol=1e-6, atol=1e-6)
    env.close()
