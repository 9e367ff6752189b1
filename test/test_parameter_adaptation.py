"""The online parameter adaptation on the model features (policy.parameter_adaptation)."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_ros.control.law import build_observation
from metarl_ros.control.model_features import num_fault_parameters, parameter_scale
from metarl_ros.core.schema import ConfigError
from metarl_ros.evaluation.episode import policy_steps
from metarl_ros.policy.factory import adaptive_feed_forward_policy, make_policy
from metarl_ros.policy.parameter_adaptation import (
    ParameterAdaptation,
    ParameterAdaptationConfig,
    ParameterAdaptationPolicy,
)
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import TaskParams, nominal_task
from metarl_ros.sim.teacher import FeedForwardTeacher
from metarl_ros.sim.true_dynamics import fault_parameters
from eval_helpers import evaluate_one_episode

N = 7
PAYLOAD = TaskParams(payload_mass=2.0, payload_offset=(0.0, 0.0, 0.05))


@pytest.fixture(scope="module")
def setup():
    return load_env_setup("sim/envs/iiwa7_compliant.yaml")


def _observation(setup, reference, offset: float = 0.0) -> np.ndarray:
    q, qd, qdd = reference
    return build_observation(setup.law, q - offset, qd, reference, np.zeros(N, np.float32))


def _reference(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=N) * 0.5, rng.normal(size=N) * 0.6, rng.normal(size=N) * 1.5


def test_correction_with_true_parameters_is_the_ceilings_feed_forward(setup):
    """Healthy motors: delta = the task's true parameters gives the teacher's label (the
    feed-forward the true model needs beyond the nominal one), for a payload and friction."""
    task = TaskParams(payload_mass=2.5, payload_offset=(0.03, -0.04, 0.05),
                      coulomb_friction=(0.8,) * N, viscous_damping=(0.3,) * N)
    adaptation = ParameterAdaptation(setup.law, setup.control_dt)
    adaptation.delta[0] = fault_parameters(task, N)
    teacher = FeedForwardTeacher(setup)
    for seed in range(4):
        reference = _reference(seed)
        label = teacher(task, reference)
        assert np.abs(label).max() > 0.05
        correction = adaptation.correction(_observation(setup, reference, 0.02)[None])[0]
        np.testing.assert_allclose(correction, label, atol=2e-4)


def test_the_law_moves_the_parameters_against_the_feedback_effort(setup):
    """An arm below its reference (e > 0 on every joint) makes the law add torque along the
    reference's feature directions: a gradient step, so the correction points along the
    feedback effort (positive inner product with it), and it grows while the error stays."""
    adaptation = ParameterAdaptation(setup.law, setup.control_dt)
    obs = _observation(setup, _reference(), offset=0.01)[None]
    assert not adaptation.correction(obs).any()
    feedback = np.asarray(setup.law.feedback.kp) * 0.01 / np.asarray(setup.law.action_scale)
    adaptation.update(obs)
    first = adaptation.correction(obs)[0]
    for _ in range(20):
        adaptation.update(obs)
    correction = adaptation.correction(obs)[0]
    assert first @ feedback > 0
    assert correction @ feedback > 10 * (first @ feedback)


def test_bounds_and_leak_keep_delta_bounded(setup):
    config = ParameterAdaptationConfig(gain=1e6, leak=2.0, bound=0.5)
    adaptation = ParameterAdaptation(setup.law, setup.control_dt, config=config)
    obs = _observation(setup, _reference(), offset=0.5)[None]  # a huge error: saturated
    for _ in range(50):
        adaptation.update(obs)
    limit = 0.5 * parameter_scale(N)
    assert np.all(np.abs(adaptation.delta[0]) <= limit + 1e-12)
    assert np.isclose(np.abs(adaptation.delta[0] / limit).max(), 1.0)
    on_reference = _observation(setup, _reference())[None]  # zero error: only the leak acts
    before = np.abs(adaptation.delta).sum()
    for _ in range(100):
        adaptation.update(on_reference)
    assert np.abs(adaptation.delta).sum() < 0.5 * before


def test_batch_rows_are_independent(setup):
    adaptation = ParameterAdaptation(setup.law, setup.control_dt, count=2)
    sagging = _observation(setup, _reference(), offset=0.01)
    exact = _observation(setup, _reference())
    adaptation.update(np.stack([sagging, exact]))
    assert adaptation.delta[0].any() and not adaptation.delta[1].any()
    adaptation.reset()
    assert not adaptation.delta.any()
    assert adaptation.delta.shape == (2, num_fault_parameters(N))


def test_needs_the_model_features():
    plain = load_env_setup("sim/envs/iiwa7_tracking.yaml")
    with pytest.raises(ConfigError, match="model_features"):
        ParameterAdaptation(plain.law, plain.control_dt)


def _episode_error(setup, policy, task, seed: int = 3) -> np.ndarray:
    env = ArmTrackingEnv(setup)
    try:
        obs, _ = env.reset(seed=seed, options={"task": task, "faults": []})
        policy.reset()
        return np.array([step.info["tracking_error"]
                         for step in policy_steps(env, policy, obs, setup.episode_steps)])
    finally:
        env.close()


def test_adaptation_removes_most_of_a_payloads_error(setup):
    """Closed loop in the simulator: a 2 kg payload from the start; the env's own controller
    keeps its error, the adaptive feed-forward learns the payload and tracks far better over
    the episode's second half."""
    fixed = _episode_error(setup, make_policy("pd", setup), PAYLOAD)
    adaptive = _episode_error(setup, adaptive_feed_forward_policy(setup), PAYLOAD)
    half = len(fixed) // 2
    assert fixed[half:].mean() > 0.01  # the payload costs the fixed controller > 10 mrad
    assert adaptive[half:].mean() < 0.5 * fixed[half:].mean()


def test_zero_gain_is_the_wrapped_policy(setup):
    off = ParameterAdaptationPolicy(make_policy("pd", setup), setup.law,
                                    ParameterAdaptationConfig(gain=0.0))
    fixed = _episode_error(setup, make_policy("pd", setup), PAYLOAD)
    np.testing.assert_array_equal(_episode_error(setup, off, PAYLOAD), fixed)
    assert not off.parameters().any()


def test_factory_wraps_the_adaptable_kinds_and_refuses_the_others(setup):
    policy = make_policy("pd", setup, parameter_adaptation=True)
    assert isinstance(policy, ParameterAdaptationPolicy)
    off = make_policy("pd", setup, adaptation=False, parameter_adaptation=True)
    assert not isinstance(off, ParameterAdaptationPolicy)  # adaptation off: all of it
    with pytest.raises(ConfigError, match="adapts by its own law"):
        make_policy("dob", setup, parameter_adaptation=True)
    plain = load_env_setup("sim/envs/iiwa7_tracking.yaml")
    with pytest.raises(ConfigError, match="model_features"):
        make_policy("pd", plain, parameter_adaptation=True)


def test_push_test_of_a_learned_method_includes_its_parameter_adaptation(setup):
    """The compliance hook measures what runs: PEARL + the law is not PEARL alone (the law
    integrates part of a push as a payload)."""
    pytest.importorskip("torch")
    from metarl_ros.core.resources import resolve_path
    from metarl_ros.evaluation.compliance import method_compliance
    from metarl_ros.evaluation.methods import METHODS

    model = resolve_path("models/pearl/model.pt")
    if not model.exists():
        pytest.skip("no shipped PEARL model")
    plain = method_compliance(METHODS["pearl"], {"pearl": model}, setup, seeds=1)
    adapting = method_compliance(METHODS["pearl_adapt"], {"pearl": model}, setup, seeds=1)
    assert adapting["push"]["parameter_adaptation"] and not plain["push"]["parameter_adaptation"]
    assert adapting["peak_deflection_mm"] != plain["peak_deflection_mm"]


def test_evaluation_and_the_nodes_run_the_same_parameter_adaptation():
    """`metarl eval`'s pearl_adapt (batched rollout + hook) and the node's policy
    (`make_policy("pearl", ..., parameter_adaptation=True)`, one env) act alike on the same
    fault episode: one law, two runners."""
    pytest.importorskip("torch")
    run = evaluate_one_episode(["pearl_adapt"], seed=3)
    setup, plan = run.setup, [run.episode]
    policy = make_policy("pearl", setup, model_path=run.models_dir / "pearl" / "model.pt",
                         maml=False, adaptation_schedule="inline", parameter_adaptation=True)
    assert isinstance(policy, ParameterAdaptationPolicy)
    env = ArmTrackingEnv(setup)
    try:
        obs, _ = env.reset(seed=int(plan[0].seed), options={"task": nominal_task(N),
                                                             "faults": plan[0].faults()})
        policy.reset()
        steps = list(policy_steps(env, policy, obs, setup.episode_steps))
    finally:
        env.close()
    actions = np.stack([step.action for step in steps])
    errors = np.array([step.info["tracking_error"] for step in steps])
    assert np.abs(policy.parameters()).max() > 0  # the law acted
    # float32 posteriors batched vs streamed: equal to rounding (measured 1.2e-7, 1.5e-8)
    np.testing.assert_allclose(actions, run.actions["pearl_adapt"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(errors, run.tracking_error["pearl_adapt"], rtol=0, atol=1e-6)
