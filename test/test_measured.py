"""The measured observation a correction reads at the joint state: its tracking errors are the
observation's, and the whole observation is built only when asked for."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_ros.control.law import build_observation
from metarl_ros.control.measured import MeasuredObservation, tracking_errors
from metarl_ros.sim.env_config import load_env_setup


@pytest.fixture(scope="module")
def law():
    return load_env_setup("sim/envs/iiwa7_compliant.yaml").law


def test_tracking_errors_are_the_observations_blocks_bit_for_bit(law) -> None:
    """Random states, tiny and huge errors (beyond float32: inf, as numpy's cast gives), NaN:
    the same float32 values as the observation's two error blocks."""
    n = law.num_joints
    rng = np.random.default_rng(0)
    for i in range(200):
        scale = 10.0 ** rng.integers(-9, 3)
        position, velocity = rng.normal(size=n) * scale, rng.normal(size=n) * scale
        reference = tuple(rng.normal(size=n) for _ in range(3))
        if i % 20 == 5:
            velocity[i % n] = 1e40  # over float32's range
        if i % 20 == 9:
            position[i % n] = np.nan
        obs = build_observation(law, position, velocity, reference, np.zeros(n, np.float32))
        errors = np.asarray(tracking_errors(law, position, velocity, reference), np.float32)
        np.testing.assert_array_equal(errors.view(np.uint32)[~np.isnan(errors)],
                                      obs[2 * n:4 * n].view(np.uint32)[~np.isnan(errors)])
        np.testing.assert_array_equal(np.isnan(errors), np.isnan(obs[2 * n:4 * n]))


def test_the_observation_is_built_once_and_only_when_asked(law, monkeypatch) -> None:
    import metarl_ros.control.measured as measured_module

    n = law.num_joints
    rng = np.random.default_rng(1)
    position, velocity = rng.normal(size=n), rng.normal(size=n)
    reference = tuple(rng.normal(size=n) for _ in range(3))
    previous = rng.uniform(-1, 1, n).astype(np.float32)
    built = []
    original = measured_module.build_observation
    monkeypatch.setattr(measured_module, "build_observation",
                        lambda *args: built.append(1) or original(*args))
    measured = MeasuredObservation(law, position, velocity, reference, previous)
    errors = measured.tracking_errors()
    assert built == []
    obs = measured.observation()
    assert measured.observation() is obs and built == [1]
    np.testing.assert_array_equal(obs, build_observation(law, position, velocity, reference,
                                                         previous))
    given = MeasuredObservation.given(obs, n)
    assert given.observation() is obs and given.tracking_errors() == errors
