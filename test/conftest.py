"""Test-wide setup: keep DDS on loopback, on a ROS domain of this run's own; shared fixtures.

`make test` sets these already; setting them here makes a bare `pytest` just as safe.
Values already in the environment win.

Fixtures (module scope, on the default env; a test module may define its own instead):
``setup`` (the env setup), ``model`` (its RigidBodyModel), ``sim`` (one ArmSimulation of it,
closed after the module). Their imports are lazy so that collecting a test module that does not
use them imports nothing heavy.
"""

import os

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
# 1..101: Linux-safe domain ids (higher ones put DDS ports in the ephemeral range).
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 101 + 1))


@pytest.fixture(scope="module")
def setup():
    from metarl_ros.sim.env_config import load_env_setup

    return load_env_setup()


@pytest.fixture(scope="module")
def model(setup):
    from metarl_ros.control.rigid_body import RigidBodyModel

    return RigidBodyModel.from_robot(setup.robot, setup.robot_path)


@pytest.fixture(scope="module")
def sim(setup):
    from metarl_ros.sim.arm_sim import ArmSimulation

    simulation = ArmSimulation(
        setup.robot, sim_rate_hz=setup.config.sim_rate_hz, robot_file=setup.robot_path, seed=0
    )
    yield simulation
    simulation.close()
