"""The Pinocchio model (RigidBodyModel) against the PyBullet arm it must reproduce.

Tolerances come from measured margins: Pinocchio and PyBullet agree to ~1e-14 N*m on the
intact arm, and to ~0.1 rad/s^2 (of ~30) with the payload, which PyBullet simulates as a
separate body on a (slightly soft) fixed constraint.
"""

from __future__ import annotations

import numpy as np
import pybullet
import pytest

from metarl_ros.control.rigid_body import (
    RigidBodyModel,
    link_inertias_file,
    point_mass_parameters,
    read_link_inertias,
    resolve_urdf,
    simulator_link_inertias,
)
from metarl_ros.sim.tasks import TaskParams

PAYLOAD = TaskParams(payload_mass=3.0, payload_offset=(0.05, -0.04, 0.05))
PAYLOAD_RADIUS = 0.03  # the simulator's payload sphere
# fixtures setup, model and sim: test/conftest.py


def _random_states(rng, setup, count):
    q0 = np.asarray(setup.robot.default_pose)
    for _ in range(count):
        yield q0 + rng.uniform(-0.8, 0.8, 7), rng.uniform(-1.5, 1.5, 7), rng.uniform(-5, 5, 7)


def test_rnea_matches_pybullet_inverse_dynamics(setup, model, sim):
    # The simulator's own body (armature applied by it): private handles, test-only.
    sim.reset(np.asarray(setup.robot.default_pose))
    rng = np.random.default_rng(0)
    for q, qd, qdd in _random_states(rng, setup, 5):
        expected = pybullet.calculateInverseDynamics(
            sim._body, q.tolist(), qd.tolist(), qdd.tolist(), physicsClientId=sim._client
        )
        tau = model.inverse_dynamics(q, qd, qdd)
        assert np.max(np.abs(tau - expected)) < 1e-9, (tau, expected)
        mass = model.mass_matrix(q)
        coriolis = model.coriolis_matrix(q, qd)
        assert np.allclose(mass @ qdd + coriolis @ qd + model.gravity(q), tau, atol=1e-9)
        assert np.allclose(model.coriolis(q, qd), coriolis @ qd, atol=1e-9)


def test_cached_link_inertias_are_what_pybullet_derives_now(setup, model):
    # from_robot reads sim/robots/<robot>_link_inertias.yaml (so the deployed node needs no
    # PyBullet); it must not go stale against the URDF or the installed PyBullet.
    cached_file = link_inertias_file(setup.robot_path)
    assert cached_file.is_file(), f"regenerate: python -m metarl_ros.control.rigid_body "\
        f"{setup.robot_path}"
    cached = read_link_inertias(cached_file, setup.robot.urdf)
    derived = simulator_link_inertias(resolve_urdf(setup.robot.urdf, setup.robot_path))
    assert sorted(cached) == sorted(derived)
    for name, inertia in derived.items():
        assert np.isclose(cached[name].mass, inertia.mass, rtol=1e-12, atol=0), name
        assert np.allclose(cached[name].lever, inertia.lever, rtol=1e-12, atol=1e-15), name
        assert np.allclose(cached[name].inertia, inertia.inertia, rtol=1e-12, atol=1e-15), name
    # ... and the model built from the cache is the one built from PyBullet directly.
    direct = RigidBodyModel(resolve_urdf(setup.robot.urdf, setup.robot_path),
                            setup.robot.joint_names, setup.robot.flange_link, setup.robot.armature)
    q = np.asarray(setup.robot.default_pose)
    assert np.allclose(direct.mass_matrix(q), model.mass_matrix(q), rtol=1e-12, atol=1e-14)
    assert np.allclose(direct.gravity(q), model.gravity(q), rtol=1e-12, atol=1e-12)


def test_urdf_inertia_is_not_what_pybullet_simulates(setup, model):
    # PyBullet derives rotational inertia from the collision meshes: the file's tensors would
    # be a different arm (this is why inertia_source="simulator" is the default).
    urdf_model = RigidBodyModel.from_robot(setup.robot, setup.robot_path, inertia_source="urdf")
    q = np.asarray(setup.robot.default_pose)
    assert np.max(np.abs(urdf_model.mass_matrix(q) - model.mass_matrix(q))) > 0.01
    assert np.allclose(urdf_model.gravity(q), model.gravity(q))  # masses and COMs agree


@pytest.mark.parametrize("with_payload", [False, True])
def test_one_physics_step_matches_forward_dynamics(setup, model, sim, with_payload):
    task = PAYLOAD if with_payload else TaskParams()
    truth = (
        model.with_payload(task.payload_mass, task.payload_offset, PAYLOAD_RADIUS)
        if with_payload else model
    )
    tolerance = 0.3 if with_payload else 1e-8  # rad/s^2 (measured: <= 0.12 and 5e-14)
    rng = np.random.default_rng(1)
    for q, qd, _ in _random_states(rng, setup, 3):
        sim.reset(q, qd, task=task)
        for _ in range(10):  # let the payload constraint settle after attaching
            sim.step(np.zeros(7), substeps=1)
        state = sim.true_state()
        command = rng.uniform(-5, 5, 7)
        sim.step(command, substeps=1)
        measured = (sim.true_state().velocity - state.velocity) / sim.dt
        torque = command + model.gravity(state.position)  # the firmware adds nominal gravity
        predicted = truth.forward_dynamics(state.position, state.velocity, torque)
        assert np.max(np.abs(measured - predicted)) < tolerance, (measured, predicted)
        if with_payload:  # the intact model is far off: the check can tell them apart
            wrong = model.forward_dynamics(state.position, state.velocity, torque)
            assert np.max(np.abs(measured - wrong)) > 10 * tolerance


def test_payload_gravity_holds_the_simulated_arm(setup, model, sim):
    q0 = np.asarray(setup.robot.default_pose)
    truth = model.with_payload(PAYLOAD.payload_mass, PAYLOAD.payload_offset, PAYLOAD_RADIUS)
    drift = {}
    for name, holding in (("true", truth), ("nominal", model)):
        sim.reset(q0, task=PAYLOAD)
        for _ in range(50):  # 0.5 s at 100 Hz
            q = sim.true_state().position
            sim.step(holding.gravity(q) - model.gravity(q), substeps=5)
        drift[name] = np.max(np.abs(sim.true_state().position - q0))
    assert drift["true"] < 1e-5  # measured 7e-8 rad
    assert drift["nominal"] > 0.05  # the arm sags without the payload's gravity


def test_payload_regressor(model):
    rng = np.random.default_rng(2)
    payload = point_mass_parameters(2.0, (0.03, -0.02, 0.05), radius=0.03)
    loaded = model.with_payload(2.0, (0.03, -0.02, 0.05), radius=0.03)
    assert np.allclose(loaded.flange_parameters() - model.flange_parameters(), payload)
    for _ in range(3):
        q, qd, qd_r, qdd_r = (rng.uniform(-1.5, 1.5, 7) for _ in range(4))
        slotine_li = model.payload_regressor(q, qd, qd_r, qdd_r)
        assert slotine_li.shape == (7, 10)
        extra = loaded.slotine_li_torque(q, qd, qd_r, qdd_r) - model.slotine_li_torque(
            q, qd, qd_r, qdd_r
        )
        assert np.allclose(slotine_li @ payload, extra, atol=1e-9)
        assert np.abs(extra).max() > 0.1
        # with qd_r = qd it is the flange link's block of Pinocchio's torque regressor
        plain = model.payload_regressor(q, qd, None, qdd_r)
        assert np.allclose(model.payload_regressor(q, qd, qd, qdd_r), plain, atol=1e-9)
        assert np.allclose(
            plain @ payload,
            loaded.inverse_dynamics(q, qd, qdd_r) - model.inverse_dynamics(q, qd, qdd_r),
            atol=1e-9,
        )


def test_mass_matrix_and_coriolis_properties(model):
    rng = np.random.default_rng(3)
    q, qd = rng.uniform(-1.5, 1.5, 7), rng.uniform(-1.5, 1.5, 7)
    mass = model.mass_matrix(q)
    assert np.allclose(mass, mass.T) and np.linalg.eigvalsh(mass).min() > 0
    h = 1e-6
    mass_rate = (model.mass_matrix(q + h * qd) - model.mass_matrix(q - h * qd)) / (2 * h)
    skew = mass_rate - 2 * model.coriolis_matrix(q, qd)
    assert np.allclose(skew, -skew.T, atol=1e-6)
    # armature as the simulator adds it: every moving link gets J_a about all axes, so the
    # last joint's mass matrix entry is its link's axial inertia plus 0.1 kg*m^2
    assert 0.1 < mass[6, 6] < 0.102


def test_joints_are_mapped_by_name(setup, model):
    robot = setup.robot
    order = [3, 0, 6, 1, 5, 2, 4]
    shuffled = RigidBodyModel(
        resolve_urdf(robot.urdf, setup.robot_path),
        [robot.joint_names[i] for i in order],
        robot.flange_link,
        [robot.armature[i] for i in order],
    )
    rng = np.random.default_rng(4)
    q, qd, qdd = rng.uniform(-1, 1, 7), rng.uniform(-1, 1, 7), rng.uniform(-1, 1, 7)
    tau = model.inverse_dynamics(q, qd, qdd)
    assert np.allclose(shuffled.inverse_dynamics(q[order], qd[order], qdd[order]), tau[order])
    assert np.allclose(shuffled.mass_matrix(q[order]), model.mass_matrix(q)[np.ix_(order, order)])
    y = model.payload_regressor(q, qd, None, qdd)
    assert np.allclose(shuffled.payload_regressor(q[order], qd[order], None, qdd[order]), y[order])


def test_invalid_inputs_are_rejected(setup):
    urdf = resolve_urdf(setup.robot.urdf, setup.robot_path)
    with pytest.raises(ValueError, match="not in"):
        RigidBodyModel(urdf, ["no_such_joint"], setup.robot.flange_link)
    with pytest.raises(ValueError, match="armature"):
        RigidBodyModel(urdf, setup.robot.joint_names, setup.robot.flange_link, [0.1])
    with pytest.raises(ValueError, match="link"):
        RigidBodyModel(urdf, setup.robot.joint_names, "no_such_link")
