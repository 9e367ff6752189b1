"""Build the :class:`~metarl_ros.runtime.AdaptivePolicy` a node runs, by kind.

``pd``    -- the classical controller: the env's fixed PD feedback (``feedback.kp/kd`` in the
             env YAML, applied by :func:`~metarl_ros.sim.env.effort_command`) with no learned
             residual, i.e. :class:`~metarl_ros.runtime.PDPolicy` with zero gains. Optional
             ``pd_kp``/``pd_kd`` make PDPolicy add an extra PD on top. Needs no model.
``pearl`` -- the trained PEARL(+MAML) runtime, ``metarl_ros.learning.runtime.
             load_adaptive_policy(model_path, adaptation)``, imported only when asked for so
             the nodes start without torch when running ``pd``.

A model's contract must match the env setup the node runs (joint names and order, observation
and action sizes, action scale): a mismatch fails at start-up with a message naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from metarl_ros.config import ConfigError
from metarl_ros.resources import resolve_path
from metarl_ros.runtime import AdaptivePolicy, PDPolicy, PolicyContract
from metarl_ros.sim.env import EnvSetup

POLICY_KINDS: tuple[str, ...] = ("pd", "pearl")


def setup_contract(setup: EnvSetup) -> PolicyContract:
    """The contract implied by an env setup (what a policy for it must expect)."""
    robot = setup.robot
    return PolicyContract(
        joint_names=tuple(robot.joint_names),
        control_rate_hz=float(setup.config.control_rate_hz),
        window_size=0,
        latent_dim=0,
        obs_dim=setup.obs_dim,
        act_dim=setup.act_dim,
        action_scale=tuple(float(v) for v in robot.action_scale),
        effort_limits=tuple(float(v) for v in robot.effort_limits),
    )


def feedback_gains(setup: EnvSetup) -> tuple[np.ndarray, np.ndarray]:
    """The env's fixed PD feedback gains (N*m/rad, N*m*s/rad), per joint."""
    feedback = setup.config.feedback
    return np.asarray(feedback.kp, dtype=np.float64), np.asarray(feedback.kd, dtype=np.float64)


def check_contract(contract: PolicyContract, setup: EnvSetup, source: str) -> None:
    """Raise :class:`ConfigError` if a policy's contract does not fit ``setup``."""
    expected = setup_contract(setup)
    problems = []
    if tuple(contract.joint_names) != expected.joint_names:
        problems.append(f"joint_names {list(contract.joint_names)} != robot's "
                        f"{list(expected.joint_names)}")
    for name in ("obs_dim", "act_dim"):
        if getattr(contract, name) != getattr(expected, name):
            problems.append(f"{name} {getattr(contract, name)} != {getattr(expected, name)}")
    if not np.allclose(contract.action_scale, expected.action_scale):
        problems.append(f"action_scale {list(contract.action_scale)} != "
                        f"{list(expected.action_scale)}")
    if abs(contract.control_rate_hz - expected.control_rate_hz) > 1e-6:
        problems.append(f"control_rate_hz {contract.control_rate_hz} != "
                        f"{expected.control_rate_hz}")
    if problems:
        raise ConfigError(f"{source}: policy contract does not match {setup.path}: "
                          + "; ".join(problems))


def make_policy(
    kind: str,
    setup: EnvSetup,
    model_path: str | Path = "",
    adaptation: bool = True,
    pd_kp: Sequence[float] | None = None,
    pd_kd: Sequence[float] | None = None,
) -> AdaptivePolicy:
    """Return a ready policy of ``kind`` (one of :data:`POLICY_KINDS`) for ``setup``."""
    if kind == "pd":
        zeros = np.zeros(setup.act_dim)
        kp = np.asarray(pd_kp, dtype=np.float64) if pd_kp else zeros
        kd = np.asarray(pd_kd, dtype=np.float64) if pd_kd else zeros
        if kp.shape != (setup.act_dim,) or kd.shape != (setup.act_dim,):
            raise ConfigError(f"pd_kp and pd_kd need {setup.act_dim} entries each")
        obs_cfg = setup.config.observation
        return PDPolicy(setup_contract(setup), kp, kd, obs_cfg.position_error_scale,
                        obs_cfg.velocity_error_scale)
    if kind == "pearl":
        if not str(model_path):
            raise ConfigError("policy 'pearl' needs a model path (parameter model_path)")
        path = resolve_path(model_path)
        if not path.exists():
            raise ConfigError(f"{path}: model not found")
        from metarl_ros.learning.runtime import load_adaptive_policy  # torch: import lazily

        policy = load_adaptive_policy(path, adaptation=adaptation)
        check_contract(policy.contract, setup, str(path))
        return policy
    raise ConfigError(f"unknown policy {kind!r}; choose one of {', '.join(POLICY_KINDS)}")
