"""Build the :class:`~metarl_ros.control.policy_interface.AdaptivePolicy` a node runs, by kind.

``pd``    -- the classical controller: the env's own control law with no learned residual
             (its fixed PD feedback ``feedback.kp/kd``, plus the nominal inverse-dynamics
             feed-forward when the env sets ``feed_forward: nominal_model``; both applied by
             :func:`~metarl_ros.control.law.effort_command`), i.e.
             :class:`~metarl_ros.policy.pd.PDPolicy` with zero gains. Optional
             ``pd_kp``/``pd_kd`` make PDPolicy add an extra PD on top. Needs no model.
``pearl`` -- the trained PEARL(+MAML) runtime, imported only when asked for so the nodes
             start without torch when running ``pd``: with MAML and the ``background``
             schedule :class:`~metarl_ros.policy.process_adapted.ProcessAdaptedPolicy` (no
             torch in the control path, MAML in a process of its own), otherwise
             ``metarl_ros.policy.torch_policy.load_adaptive_policy``.
``onnx``  -- an exported model (``metarl export``) in onnxruntime:
             :class:`metarl_ros.policy.onnx_policy.OnnxAdaptivePolicy`, PEARL's policy and
             streaming posterior without torch (MAML adaptation needs gradients and stays in
             ``pearl``).
             ``model_path`` is the export directory, its ``policy.onnx``, or a folder holding
             it as ``onnx/``.
``dob``   -- the classical competitor a control engineer deploys first: a generalized-momentum
             disturbance observer whose torque estimate is fed forward on a computed-torque
             nominal controller at the PD's compliance
             (:mod:`metarl_ros.policy.momentum_observer`). Needs no model, no torch.
``adaptive_ct`` -- Slotine-Li adaptive computed torque, adapting the payload's inertial
             parameters and a per-joint motor strength at the PD's compliance
             (:mod:`metarl_ros.policy.adaptive_computed_torque`). Needs no model, no torch.

Online adaptation: ``adaptation=False`` wraps a learned policy in
:class:`~metarl_ros.policy.frozen_context.FrozenContext` (it never sees a transition, its
latent stays at the prior, no MAML): the trained controller before any adaptation. With
``adaptation=True`` the streaming posterior runs, and for ``pearl`` with ``maml=True`` the MAML
dynamics correction too,
adapted in a separate process every 0.1 s of wall time (``adaptation_schedule="background"``,
a robot: :mod:`metarl_ros.policy.adaptation_process`) or inline in the control callback every
``adapt_every`` transitions (``"inline"``: deterministic, for a simulator in lockstep, whose
time is not the wall clock's).

A model's contract must match the env setup the node runs (joint names and order, observation
and action sizes, action scale, default pose, observation scales, PD feedback gains) and what
the node is configured for (``expected_*``: joints, control rate, context window): a mismatch
fails at start-up with a message naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from metarl_ros.control.policy_interface import AdaptivePolicy, PolicyContract
from metarl_ros.core.resources import resolve_path
from metarl_ros.core.schema import ConfigError
from metarl_ros.policy.frozen_context import FrozenContext
from metarl_ros.policy.onnx_policy import POSTERIOR_UPDATES, check_expected_contract
from metarl_ros.policy.pd import PDPolicy
from metarl_ros.sim.env_config import EnvSetup

POLICY_KINDS: tuple[str, ...] = ("pd", "pearl", "onnx", "dob", "adaptive_ct")
DEPLOY_KINDS: tuple[str, ...] = ("onnx", "dob", "adaptive_ct", "pd")
"""The kinds that run without torch: what the deployed node (onnx_policy_node) offers."""
ADAPTATION_SCHEDULES: tuple[str, ...] = ("background", "inline")
ADAPTABLE_KINDS: tuple[str, ...] = ("pd", "pearl", "onnx")
"""The kinds :mod:`~metarl_ros.policy.parameter_adaptation` can refine (a feed-forward on the
env's controller; ``dob`` and ``adaptive_ct`` have their own adaptation)."""


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
    problems += _extra_problems(contract.extra, setup)
    if problems:
        raise ConfigError(f"{source}: policy contract does not match {setup.path}: "
                          + "; ".join(problems))


def _extra_problems(extra: dict, setup: EnvSetup) -> list[str]:
    """Differences in the contract fields a model file may carry beyond the core ones."""
    problems = []
    if "default_pose" in extra and not np.allclose(extra["default_pose"],
                                                   setup.robot.default_pose):
        problems.append(f"default_pose {list(extra['default_pose'])} != "
                        f"{list(setup.robot.default_pose)}")
    if "observation" in extra:
        expected = setup.config.observation.model_dump()
        for key, value in sorted(extra["observation"].items()):
            if key in expected and not np.allclose(value, expected[key]):
                problems.append(f"observation.{key} {value} != {expected[key]}")
    if "feedback" in extra:
        expected = setup.config.feedback.model_dump()
        for key in ("kp", "kd"):
            if key in extra["feedback"] and not np.allclose(extra["feedback"][key],
                                                            expected[key]):
                problems.append(f"feedback.{key} {extra['feedback'][key]} != {expected[key]}")
    return problems


def make_policy(
    kind: str,
    setup: EnvSetup,
    model_path: str | Path = "",
    adaptation: bool = True,
    maml: bool = True,
    adaptation_schedule: str = "background",
    posterior_update: str = "tick",
    parameter_adaptation: bool = False,
    pd_kp: Sequence[float] | None = None,
    pd_kd: Sequence[float] | None = None,
    expected_joint_names: Sequence[str] | None = None,
    expected_rate_hz: float | None = None,
    expected_window: int | None = None,
) -> AdaptivePolicy:
    """Return a ready policy of ``kind`` (one of :data:`POLICY_KINDS`) for ``setup``.

    ``expected_*`` (``None`` = not checked) are what the node is configured for; a model
    whose contract differs raises
    :class:`~metarl_ros.policy.onnx_policy.ModelContractError`. ``pd`` has no model and
    ignores them, and the adaptation arguments (module docstring). ``parameter_adaptation``
    (with ``adaptation``) wraps a ``pd``, ``pearl`` or ``onnx`` policy in
    :class:`~metarl_ros.policy.parameter_adaptation.ParameterAdaptationPolicy`.
    """
    if parameter_adaptation and kind not in ADAPTABLE_KINDS:
        raise ConfigError(f"parameter_adaptation applies to policies {', '.join(ADAPTABLE_KINDS)}"
                          f"; {kind!r} adapts by its own law")
    policy = _make_policy(kind, setup, model_path, adaptation, maml, adaptation_schedule,
                          posterior_update, pd_kp, pd_kd, expected_joint_names, expected_rate_hz,
                          expected_window)
    if parameter_adaptation and adaptation:
        from metarl_ros.policy.parameter_adaptation import ParameterAdaptationPolicy

        return ParameterAdaptationPolicy(policy, setup.law)
    return policy


def _make_policy(kind, setup, model_path, adaptation, maml, adaptation_schedule,
                 posterior_update, pd_kp, pd_kd, expected_joint_names, expected_rate_hz,
                 expected_window) -> AdaptivePolicy:
    """:func:`make_policy` without the parameter adaptation."""
    if adaptation_schedule not in ADAPTATION_SCHEDULES:
        raise ConfigError(f"adaptation_schedule {adaptation_schedule!r}: expected one of "
                          f"{', '.join(ADAPTATION_SCHEDULES)}")
    if posterior_update not in POSTERIOR_UPDATES:
        raise ConfigError(f"posterior_update {posterior_update!r}: expected one of "
                          f"{', '.join(POSTERIOR_UPDATES)}")
    if posterior_update != "tick" and kind != "onnx":
        raise ConfigError(f"posterior_update {posterior_update!r} applies to policy 'onnx' "
                          f"only (policy {kind!r} updates its posterior every tick)")
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
        from metarl_ros.learning.saved_model import load_model  # torch: import lazily
        from metarl_ros.policy.torch_policy import load_adaptive_policy

        loaded = load_model(path)
        if loaded.agent.spec.conditioning != "latent":
            raise ConfigError(
                f"{loaded.path}: a {loaded.method!r} model, without the context encoder policy "
                "'pearl' adapts with; run PEARL models with policy 'pearl', or export this one "
                "(`metarl export`) and run it with policy 'onnx'")
        check_expected_contract(loaded.contract, path, expected_joint_names, expected_rate_hz,
                                expected_window)
        check_contract(loaded.contract, setup, str(path))
        if adaptation and maml and adaptation_schedule == "background":
            from metarl_ros.policy.dynamics_adaptation import dynamics_for
            from metarl_ros.policy.process_adapted import load_process_adapted_policy

            dynamics_for(loaded, with_latent=True)  # no MAML model: refused before any process
            return load_process_adapted_policy(loaded)
        policy = load_adaptive_policy(loaded, adaptation=adaptation and maml,
                                      background=adaptation_schedule == "background")
        return policy if adaptation else FrozenContext(policy)
    if kind == "onnx":
        if not str(model_path):
            raise ConfigError("policy 'onnx' needs an exported model (parameter model_path: "
                              "a `metarl export` directory)")
        from metarl_ros.policy.onnx_policy import OnnxAdaptivePolicy, find_model_dir

        model_dir = find_model_dir(resolve_path(model_path))
        policy = OnnxAdaptivePolicy(
            model_dir,
            expected_joint_names=list(expected_joint_names) if expected_joint_names else None,
            expected_rate_hz=expected_rate_hz, expected_window=expected_window,
            posterior_update=posterior_update)
        check_contract(policy.contract, setup, str(model_dir / "policy.onnx"))
        return policy if adaptation else FrozenContext(policy)
    if kind == "dob":
        from metarl_ros.policy.momentum_observer import momentum_observer_policy  # pinocchio

        return momentum_observer_policy(setup)
    if kind == "adaptive_ct":
        from metarl_ros.policy.adaptive_computed_torque import slotine_li_policy  # pinocchio

        return slotine_li_policy(setup)
    raise ConfigError(f"unknown policy {kind!r}; choose one of {', '.join(POLICY_KINDS)}")


def adaptive_feed_forward_policy(setup: EnvSetup, config=None) -> AdaptivePolicy:
    """The env's own controller (``pd``: PD, nominal feed-forward, a zero action) with the
    parameter adaptation law (:class:`~metarl_ros.policy.parameter_adaptation.
    ParameterAdaptationConfig` ``config``, default the shipped gains): a classical adaptive
    feed-forward on the model features, with no learned prior."""
    from metarl_ros.policy.parameter_adaptation import ParameterAdaptationPolicy

    return ParameterAdaptationPolicy(make_policy("pd", setup), setup.law, config)
