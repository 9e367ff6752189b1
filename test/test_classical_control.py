"""The classical controllers: computed torque (ceiling), momentum observer, Slotine-Li.

Analytic checks run in a closed loop simulated with the RigidBodyModel itself (100 Hz
zero-order-hold commands, 1 kHz semi-implicit Euler, the firmware's nominal gravity added as
in the simulator), so they are fast and need no PyBullet; the env tests run a few hundred
steps of the real simulation. Thresholds sit between measured values (noted) and what a
broken controller gives.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from metarl_ros.control.law import build_observation, effort_command
from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.control.rigid_body import point_mass_parameters
from metarl_ros.policy.adaptive_computed_torque import SlotineLiController, slotine_li_policy
from metarl_ros.policy.computed_torque import ObservationCodec, computed_torque_policy
from metarl_ros.policy.momentum_observer import (
    MomentumObserverController,
    momentum_observer_policy,
)
from metarl_ros.sim.tasks import FaultEvent, TaskParams
from metarl_ros.sim.true_dynamics import ComputedTorqueController, FeedbackGains

DT = 0.01
PAYLOAD_MASS, PAYLOAD_OFFSET = 2.5, (0.03, -0.02, 0.06)
# fixtures setup and model: test/conftest.py


@pytest.fixture(scope="module")
def gains(setup):
    """The env PD's gains (N*m/rad, N*m*s/rad) and the robot's effort limits."""
    law = setup.law
    return np.asarray(law.feedback.kp), np.asarray(law.feedback.kd), np.asarray(
        setup.robot.effort_limits
    )


def multisine(q0: np.ndarray):
    amp = np.array([0.3, 0.25, 0.3, 0.25, 0.3, 0.3, 0.3])
    w1 = 2 * np.pi * np.array([0.31, 0.23, 0.37, 0.29, 0.41, 0.27, 0.33])
    w2 = 2 * np.pi * np.array([0.13, 0.17, 0.11, 0.19, 0.07, 0.21, 0.15])

    def reference(t: float):
        return (
            q0 + amp * (np.sin(w1 * t) + 0.5 * np.sin(w2 * t)),
            amp * (w1 * np.cos(w1 * t) + 0.5 * w2 * np.cos(w2 * t)),
            -amp * (w1**2 * np.sin(w1 * t) + 0.5 * w2**2 * np.sin(w2 * t)),
        )

    return reference


def simulate(controller, plant, nominal, limits, reference, duration, strength=1.0,
             disturbance=0.0):
    """Closed loop on ``plant``; returns per-step ||q_ref - q|| (rad), estimates, final q."""
    q, qd = (np.array(v, dtype=float) for v in reference(0.0)[:2])
    errors, estimates, h = [], [], DT / 10
    for k in range(int(round(duration / DT))):
        command = controller.torque(q, qd, *reference(k * DT), DT)
        torque = strength * np.clip(command + nominal.gravity(q), -limits, limits) + disturbance
        for _ in range(10):
            qd = qd + h * plant.forward_dynamics(q, qd, torque)
            q = q + h * qd
        errors.append(np.linalg.norm(reference((k + 1) * DT)[0] - q))
        if hasattr(controller, "estimate"):
            estimates.append(controller.estimate())
    return np.asarray(errors), np.asarray(estimates), q


def rms_mrad(errors: np.ndarray) -> float:
    return 1000.0 * float(np.sqrt(np.mean(np.square(errors))))


# ------------------------------------------------------------------ rigid-body closed loops


def test_observer_estimates_a_constant_disturbance_at_its_rate_and_cancels_it(
    setup, model, gains
):
    kp, kd, limits = gains
    disturbance = np.array([3.0, -5.0, 2.0, 1.0, -1.0, 0.5, 0.2])
    reference = multisine(np.asarray(setup.robot.default_pose))
    k_o = 20.0
    dob = MomentumObserverController(model, limits, FeedbackGains.torque(kp, kd),
                                     observer_gain=k_o)
    errors, residuals, _ = simulate(dob, model, model, limits, reference, 1.0,
                                    disturbance=disturbance)
    # documented sampled first-order response: r_k = d (1 - (1 - K_O dt)^k)
    expected = disturbance * (1 - (1 - k_o * DT) ** np.arange(len(residuals)))[:, None]
    assert np.max(np.abs(residuals - expected) / np.abs(disturbance)) < 0.01  # measured 0.0015
    assert np.allclose(residuals[-1], disturbance, rtol=0.01)
    # cancelled: the same feedback without the observer sags by about d / Kp
    plain = ComputedTorqueController(model, limits, FeedbackGains.torque(kp, kd))
    plain_errors, _, _ = simulate(plain, model, model, limits, reference, 1.0,
                                  disturbance=disturbance)
    assert rms_mrad(errors[50:]) < 2.0  # measured 0.94
    assert rms_mrad(plain_errors[50:]) > 10 * rms_mrad(errors[50:])


def test_slotine_li_identifies_a_payload_and_tracks(setup, model, gains):
    kp, kd, limits = gains
    plant = model.with_payload(PAYLOAD_MASS, PAYLOAD_OFFSET)
    truth = point_mass_parameters(PAYLOAD_MASS, PAYLOAD_OFFSET)
    reference = multisine(np.asarray(setup.robot.default_pose))
    adaptive = SlotineLiController(model, limits, kp, kd)
    errors, estimates, _ = simulate(adaptive, plant, model, limits, reference, 6.0)
    mass_error = np.abs(estimates[:, 0] - truth[0])
    moment_error = np.linalg.norm(estimates[:, 1:4] - truth[1:4], axis=1)
    assert mass_error[-1] < 0.15 < mass_error[0]  # measured 0.08 of 2.5 kg
    assert moment_error[-1] < 0.5 * np.linalg.norm(truth[1:4])  # measured 0.03 of 0.17
    assert np.all(estimates[-1, 10:] > 0.95)  # healthy motors are not blamed (measured 0.985)
    assert np.all(estimates[:, 10:] > 0.9)  # not even in the first transient (measured 0.94)
    # the true-model computed torque at the same compliance is this loop's floor
    ceiling = ComputedTorqueController(
        model, limits, FeedbackGains.torque(kp, kd),
        TaskParams(payload_mass=PAYLOAD_MASS, payload_offset=PAYLOAD_OFFSET),
    )
    ceiling.model = plant  # exactly the plant (the sim's payload sphere is not used here)
    floor = rms_mrad(simulate(ceiling, plant, model, limits, reference, 6.0)[0][500:])
    nominal = ComputedTorqueController(model, limits, FeedbackGains.torque(kp, kd))
    unadapted = rms_mrad(simulate(nominal, plant, model, limits, reference, 6.0)[0][500:])
    adapted = rms_mrad(errors[500:])
    assert adapted < 3 * floor + 0.2  # measured 0.44 vs floor 0.26 mrad
    assert unadapted > 50 * adapted  # measured 76 mrad


def test_slotine_li_identifies_a_weak_motor(setup, model, gains):
    kp, kd, limits = gains
    strength = np.array([1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    reference = multisine(np.asarray(setup.robot.default_pose))
    adaptive = SlotineLiController(model, limits, kp, kd)
    errors, estimates, _ = simulate(adaptive, model, model, limits, reference, 3.0, strength)
    assert abs(estimates[-1, 11] - 0.5) < 0.05  # measured 0.5003
    assert rms_mrad(errors[200:]) < 1.0  # measured 0.17


def test_slotine_li_estimates_stay_bounded_with_absurd_gains(setup, model, gains):
    kp, kd, limits = gains
    adaptive = SlotineLiController(model, limits, kp, kd, gamma_payload=1e7, gamma_motor=1e3,
                                   mass_max=5.0, offset_max=0.1, strength_min=0.2)
    plant = model.with_payload(PAYLOAD_MASS, PAYLOAD_OFFSET)
    reference = multisine(np.asarray(setup.robot.default_pose))
    _, estimates, q = simulate(adaptive, plant, model, limits, reference, 1.0)
    assert np.all(np.isfinite(estimates)) and np.all(np.isfinite(q))
    assert np.all(estimates[:, :10] >= adaptive.low - 1e-12)
    assert np.all(estimates[:, :10] <= adaptive.high + 1e-12)
    assert estimates[:, 0].max() <= 5.0 and np.all(estimates[:, 10:] >= 0.2)
    assert np.all(estimates[:, 10:] <= 1.0)


def test_compliance_torque_space_gains_give_the_pd_stiffness(setup, model, gains):
    kp, kd, limits = gains
    q0 = np.asarray(setup.robot.default_pose)
    push = np.array([6.0, -6.0, 4.0, 4.0, -2.0, 1.0, 0.4])  # N*m

    def hold(t):
        return q0, np.zeros(7), np.zeros(7)

    compliant = ComputedTorqueController(model, limits, FeedbackGains.torque(kp, kd))
    q = simulate(compliant, model, model, limits, hold, 3.0, disturbance=push)[2]
    assert np.allclose(q - q0, push / kp, rtol=0.03)  # deflection = push / Kp
    stiff = ComputedTorqueController(model, limits)  # acceleration space: stiffness M Kp
    q = simulate(stiff, model, model, limits, hold, 3.0, disturbance=push)[2]
    expected = np.linalg.solve(model.mass_matrix(q) @ np.diag(stiff.gains.kp), push)
    assert np.allclose(q - q0, expected, rtol=0.05, atol=1e-5)


# ------------------------------------------------------------------ env adapters


def test_codec_inverts_the_observation_and_the_effort(setup):
    law = setup.law
    codec = ObservationCodec.from_law(law)
    rng = np.random.default_rng(0)
    q = np.asarray(law.default_pose) + rng.uniform(-0.5, 0.5, 7)
    qd, reference = rng.uniform(-1, 1, 7), (q + rng.uniform(-0.05, 0.05, 7),
                                            rng.uniform(-1, 1, 7), rng.uniform(-3, 3, 7))
    obs = build_observation(law, q, qd, reference, np.zeros(7, np.float32))
    decoded = codec.decode(obs)
    for got, want in zip(decoded, (q, qd, *reference)):
        assert np.allclose(got, want, atol=1e-5)
    pd = effort_command(law, np.zeros(7), q, qd, reference)
    command = pd + 0.5 * np.asarray(law.action_scale) * rng.uniform(-1, 1, 7)
    action = codec.action(command, obs)
    assert np.allclose(effort_command(law, action, q, qd, reference), command, atol=1e-3)
    assert np.allclose(codec.effort(action, obs), command, atol=1e-3)


def run_episode(env, policy, task, steps=200, fault_s=0.5, seed=0) -> float:
    """Post-fault RMS tracking error (mrad) of one episode."""
    obs, _ = env.reset(seed=seed, options={"faults": [FaultEvent(fault_s, task)]})
    if policy is not None:
        policy.reset()
    errors = []
    for _ in range(steps):
        action = np.zeros(7, np.float32) if policy is None else policy.act(obs)
        next_obs, reward, _, _, info = env.step(action)
        if policy is not None:
            policy.observe(obs, action, reward, next_obs)
        obs = next_obs
        errors.append(info["tracking_error"])
    return rms_mrad(np.asarray(errors)[int(round(fault_s / DT)):])


@pytest.fixture(scope="module")
def env(setup):
    from metarl_ros.sim.env import ArmTrackingEnv

    environment = ArmTrackingEnv(setup)
    yield environment
    environment.close()


# Chosen so the ceiling's residual stays inside the action range (|a| <= 0.8): a 3 kg payload
# with a 50 % shoulder needs more than action_scale allows, and then every controller saturates.
FAULT = TaskParams(payload_mass=2.0, payload_offset=(0.04, -0.03, 0.05),
                   motor_strength=(1.0, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0))


def test_ceiling_tracks_the_faulted_pybullet_arm_far_better_than_pd(setup, model, env, gains):
    kp, kd, _ = gains
    pd = run_episode(env, None, FAULT)
    ceiling = run_episode(env, computed_torque_policy(setup, lambda: env.true_task,
                                                      model=model), FAULT)
    compliant = run_episode(env, computed_torque_policy(
        setup, lambda: env.true_task, FeedbackGains.torque(kp, kd), model=model), FAULT)
    assert ceiling < 3.0 and ceiling < 0.05 * pd  # measured 0.6 vs 180 mrad
    assert compliant < 0.1 * pd


def test_observer_and_slotine_li_adapters_beat_pd_in_the_env(setup, model, env):
    pd = run_episode(env, None, FAULT)
    dob = momentum_observer_policy(setup, model=model)
    adaptive = slotine_li_policy(setup, model=model)
    assert isinstance(dob, AdaptivePolicy) and isinstance(adaptive, AdaptivePolicy)
    assert run_episode(env, dob, FAULT) < 0.3 * pd
    assert run_episode(env, adaptive, FAULT) < 0.5 * pd
    assert adaptive.posterior().mean.shape == (17,)
    assert dob.posterior().mean.shape == (7,) and dob.contract.latent_dim == 7


def test_controllers_import_without_torch():
    code = (
        "import sys\n"
        "import metarl_ros.policy.computed_torque, metarl_ros.policy.momentum_observer\n"
        "import metarl_ros.policy.adaptive_computed_torque\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('metarl_ros.learning')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
