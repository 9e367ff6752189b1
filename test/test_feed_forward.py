"""The control law's optional model feed-forward (env ``feed_forward: nominal_model``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metarl_ros.control.law import build_observation, effort_command, reference_terms
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


def test_reference_terms_computed_ahead_give_the_same_law():
    """What the model computes from the reference alone (the control loop computes it when the
    reference arrives) gives bit for bit the observation and efforts computed inline, with the
    shipped env's model features and a model feed-forward."""
    setup = load_env_setup()  # model features
    config = setup.config.model_copy(update={"feed_forward": "nominal_model"})
    law = dataclasses.replace(setup, config=config).law
    assert law.model_features is not None and law.feed_forward is not None
    rng = np.random.default_rng(3)
    q, qd = rng.normal(size=7) * 0.3, rng.normal(size=7)
    ref = (q + 0.01, qd, rng.normal(size=7))
    action, previous = rng.uniform(-1, 1, 7), rng.uniform(-1, 1, 7).astype(np.float32)
    terms = reference_terms(law, ref)
    assert terms.features.dtype == np.float32 and terms.feed_forward.dtype == np.float64
    np.testing.assert_array_equal(effort_command(law, action, q, qd, ref, terms),
                                  effort_command(law, action, q, qd, ref))
    np.testing.assert_array_equal(build_observation(law, q, qd, ref, previous, terms),
                                  build_observation(law, q, qd, ref, previous))
    plain = reference_terms(load_env_setup("sim/envs/iiwa7_tracking.yaml").law, ref)
    assert plain.features is None and plain.feed_forward is None
