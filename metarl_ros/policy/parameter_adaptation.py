"""Online refinement of a fault's physical parameters on the model features.

A fault changes the feed-forward the arm needs linearly in a few physical parameters
(:mod:`metarl_ros.control.model_features`): with the feature blocks ``F`` of the
observation (in action units, evaluated on the reference) and a parameter correction
``delta = [du (n), dpi (10), dd (n), dc (n)]`` the feed-forward correction is::

    a_corr = du * F_tau + sum_k dpi_k F_Yk + dd * F_qd + dc * F_tanh         (n,)

which is the model-structured actor's (:mod:`metarl_ros.learning.model_actor`) change for a
change ``delta`` of its estimate when the motors are healthy (it drops the ``(1 + u)`` factor
the structure multiplies the fault terms by: the correction stays linear in ``delta``).

``delta`` is adapted online by the desired-compensation adaptation law (Sadegh and Horowitz,
1990): the gradient of the feedback effort with respect to the parameters, with the regressor
taken on the reference (the features) instead of the measured state::

    sigma = clip((Kp e + Kd ed) / action_scale, -error_limit, error_limit)   (n,)
    Gamma = gain * scale^2 / (1 + gain * trace(F diag(scale^2) F^T) / rate_limit)
    d delta / dt = Gamma * (F^T sigma) - leak * delta
    delta := clip(delta, -bound * scale, bound * scale)

with ``e = q_ref - q``, ``ed = qd_ref - qd`` read from the observation's error blocks, ``Kp,
Kd`` the env's PD feedback and ``scale`` the parameters' typical magnitudes
(:func:`~metarl_ros.control.model_features.parameter_scale`). The normalization
(Ioannou and Sun's normalized gradient) bounds the rate at which the correction can change per
unit of effort, ``trace(F Gamma F^T) <= rate_limit``: the law is an integral action on the loop,
and on a compliant arm an integral gain that grows with the features' size (gravity torques
on the shoulder) would make it oscillate. ``Kd sigma`` is the PD's effort:
whatever the feedback has to push against, the law moves into the parameters, where it acts
through the model on the whole trajectory. Without a prior (the env's own controller) this is
a classical adaptive feed-forward; on a model-structured PEARL policy it refines PEARL's
estimate, which arrives within the context window but carries a bias (docs/LEARNING.md).

Robustness: the error saturation keeps a locked joint's or a delayed loop's large errors from
winding the shared payload parameters up; the leak (sigma-modification) and the box keep
``delta`` bounded whatever the signal.

:class:`ParameterAdaptation` is the batched numpy core (E robots);
:class:`ParameterAdaptationPolicy` wraps any
:class:`~metarl_ros.control.policy_interface.AdaptivePolicy` with it (one robot; no torch).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveFloat

from metarl_ros.control.law import ControlLaw
from metarl_ros.control.model_features import (
    NUM_BLOCKS,
    NUM_PAYLOAD_PARAMETERS,
    num_fault_parameters,
    parameter_scale,
)
from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.core.schema import ConfigError, StrictModel
from metarl_ros.policy.wrapper import PolicyWrapper


class ParameterAdaptationConfig(StrictModel):
    """Gains of the adaptation law (module doc). ``gain`` and ``rate_limit`` were chosen on the
    validation draw (docs/BENCHMARKS.md, "Parameter adaptation"); ``leak``, ``error_limit`` and
    ``bound`` were set by hand and not swept."""

    gain: NonNegativeFloat = Field(
        default=5000.0, description="1/s per (action unit)^2: the adaptation gain on the "
        "normalized parameters; 0 turns the refinement off")
    leak: NonNegativeFloat = Field(default=0.05, description="1/s: pull of delta back to 0")
    rate_limit: PositiveFloat = Field(
        default=10.0, description="1/s: normalization of the law (module doc); bounds the "
        "integral gain it adds to the loop, whatever the size of the features")
    error_limit: PositiveFloat = Field(
        default=0.2, description="action units: the PD effort the law sees is clipped to it")
    bound: PositiveFloat = Field(
        default=3.0, description="|delta| <= bound * the parameters' typical magnitudes")


class ParameterAdaptation:
    """The adaptation law for ``count`` robots at once (module doc).

    Args:
        law: the env's control law (PD gains, action scale, observation scales); its
            observation must carry the model features.
        control_dt: s between two updates.
        count: robots (rows of every batch).
        config: the law's gains.
    """

    def __init__(self, law: ControlLaw, control_dt: float, count: int = 1,
                 config: ParameterAdaptationConfig | None = None) -> None:
        if law.model_features is None:
            raise ConfigError("parameter adaptation needs the observation's model features "
                              "(env observation.model_features: true)")
        if control_dt <= 0:
            raise ConfigError(f"control_dt must be > 0, got {control_dt}")
        self.config = config or ParameterAdaptationConfig()
        n = law.num_joints
        self.num_joints = n
        self.dt = float(control_dt)
        obs = law.observation
        inverse_scale = 1.0 / np.asarray(law.action_scale, np.float64)
        # sigma = obs_e * kp_a + obs_ed * kd_a, both in action units per observation unit
        self._kp = (np.asarray(law.feedback.kp, np.float64) * inverse_scale
                    / obs.position_error_scale)
        self._kd = (np.asarray(law.feedback.kd, np.float64) * inverse_scale
                    / obs.velocity_error_scale)
        self._feature_start = law.obs_dim - NUM_BLOCKS * n
        scale = parameter_scale(n)
        self._rate = self.config.gain * scale**2
        self._limit = self.config.bound * scale
        self.delta = np.zeros((count, num_fault_parameters(n)))

    def reset(self, rows: np.ndarray | slice = slice(None)) -> None:
        """Forget what was learned (all robots, or ``rows``)."""
        self.delta[rows] = 0.0

    def _features(self, obs: np.ndarray) -> np.ndarray:
        """(E, NUM_BLOCKS, n) feature blocks of observations (E, obs_dim)."""
        n = self.num_joints
        return np.asarray(obs, np.float64)[:, self._feature_start:].reshape(-1, NUM_BLOCKS, n)

    def correction(self, obs: np.ndarray) -> np.ndarray:
        """The feed-forward correction (E, n), action units, for observations (E, obs_dim)
        (only their feature blocks are read, so the reference view serves too)."""
        features = self._features(obs)
        du, dpi, dd, dc = self._split(self.delta[: len(features)])
        regressor = features[:, 1:1 + NUM_PAYLOAD_PARAMETERS]  # (E, 10, n)
        return (du * features[:, 0] + np.einsum("ek,ekn->en", dpi, regressor)
                + dd * features[:, -2] + dc * features[:, -1])

    def corrected(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """``action`` (E, n) plus the correction for ``obs`` (E, obs_dim), clipped to
        [-1, 1], in ``action``'s dtype: what the robots execute."""
        action = np.asarray(action)
        return np.clip(action + self.correction(obs), -1.0, 1.0).astype(action.dtype)

    def update(self, obs: np.ndarray) -> None:
        """One step of the law from observations (E, obs_dim) of the robots' current state
        (their error blocks and features)."""
        n = self.num_joints
        obs = np.asarray(obs, np.float64)
        sigma = obs[:, 2 * n:3 * n] * self._kp + obs[:, 3 * n:4 * n] * self._kd
        limit = self.config.error_limit
        sigma = np.clip(sigma, -limit, limit)
        features = self._features(obs)
        # the regressor's squared column norms are its transpose, squared, applied to ones
        regressor_sq = self._transpose(features**2, np.ones_like(sigma))
        rate = self._rate / (1.0 + np.einsum("ep,p->e", regressor_sq, self._rate)[:, None]
                             / self.config.rate_limit)
        gradient = self._transpose(features, sigma)
        rows = slice(0, len(obs))
        delta = self.delta[rows]
        delta += self.dt * (rate * gradient - self.config.leak * delta)
        np.clip(delta, -self._limit, self._limit, out=delta)

    @staticmethod
    def _transpose(features: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``F^T v`` (E, 3n + 10): the regressor of :meth:`correction` (feature blocks
        (E, NUM_BLOCKS, n)) transposed, applied to ``v`` (E, n)."""
        return np.concatenate([
            features[:, 0] * v,
            np.einsum("ekn,en->ek", features[:, 1:1 + NUM_PAYLOAD_PARAMETERS], v),
            features[:, -2] * v,
            features[:, -1] * v,
        ], axis=1)

    def _split(self, delta: np.ndarray) -> list[np.ndarray]:
        n = self.num_joints
        return np.split(delta, np.cumsum([n, NUM_PAYLOAD_PARAMETERS, n]), axis=1)


class ParameterAdaptationPolicy(PolicyWrapper):
    """A policy plus the parameter adaptation law: ``act`` returns the policy's action plus
    the correction (clipped to [-1, 1]); ``observe`` steps the law on the transition's
    ``next_obs`` and passes the transition on. Other attributes are the wrapped policy's.

    Args:
        policy: any adaptive policy whose observations carry the model features.
        law: the env's control law.
        config: the law's gains.
    """

    def __init__(self, policy: AdaptivePolicy, law: ControlLaw,
                 config: ParameterAdaptationConfig | None = None) -> None:
        super().__init__(policy)
        self.acts_on_reference = False  # the law's correction follows the measured PD effort
        self.base_acts_on_reference = False  # not the wrapped policy's split: it skips the law
        # not ``adaptation``: that name is the wrapped policy's MAML adaptation (counters)
        self.parameter_law = ParameterAdaptation(law, 1.0 / policy.contract.control_rate_hz, 1,
                                                 config)

    def reset(self) -> None:
        self.parameter_law.reset()
        self.policy.reset()

    def observe(self, obs, action, reward, next_obs) -> None:
        self.parameter_law.update(np.asarray(next_obs)[None])
        self.policy.observe(obs, action, reward, next_obs)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = np.asarray(self.policy.act(obs), np.float32)
        return self.parameter_law.corrected(np.asarray(obs)[None], action[None])[0]

    def parameters(self) -> np.ndarray:
        """The current correction ``delta`` (3n + 10,), in physical units."""
        return self.parameter_law.delta[0].copy()

