"""The push test: how far a controller lets a person push the flange while it tracks.

A controller that absorbs faults only by getting stiffer also rejects a person's push: it
hides faults instead of adapting to them, and it is unsafe next to people. The test measures
the closed loop's compliance directly, in the simulator:

1. run an episode of the env (a reference, an intact or faulted robot) without a push;
2. run the same episode again (same seed, same task, same controller state at the start)
   with a force pushed on the flange, ``force_n`` (world frame) for ``duration_s`` from
   ``start_s``;
3. the **deflection** at each instant is the distance between the flange positions of the
   two runs; the result is its peak (mm) and the equivalent Cartesian stiffness
   ``|force| / peak deflection`` (N/mm).

Both runs are deterministic (the env reference and sensor noise come from the seed, the
policies act deterministically), so the difference is the push alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.evaluation.episode import policy_steps
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.tasks import TaskParams

DEFAULT_FORCE_N = (0.0, 0.0, -20.0)
"""20 N pushed down on the flange."""
DEFAULT_START_S = 1.0
DEFAULT_DURATION_S = 0.3
DEFAULT_OBSERVE_S = 1.0
"""How long after the push begins the deflection is watched (it peaks and decays)."""


@dataclass(frozen=True)
class PushResult:
    """Peak flange deflection under a push, and what it implies."""

    peak_deflection_mm: float
    force_n: float
    """magnitude of the push (N)."""
    stiffness_n_per_mm: float
    """``force_n / peak_deflection_mm``: the closed loop's Cartesian stiffness at the flange."""
    deflection_mm: np.ndarray
    """deflection at each control step of the observed window, shape (steps,)."""


def _flange_track(env: ArmTrackingEnv, policy: AdaptivePolicy | None, seed: int,
                  task: TaskParams | None, steps: int,
                  push: tuple[np.ndarray, float, float] | None) -> np.ndarray:
    """Flange positions (steps, 3) of one episode; ``policy=None`` is the PD feedback alone."""
    options = {"task": task} if task is not None else {}
    obs, _ = env.reset(seed=seed, options=options)
    if push is not None:
        env.sim.push(*push)
    if policy is not None:
        policy.reset()
    track = np.zeros((steps, 3))
    for t, _ in enumerate(policy_steps(env, policy, obs, steps)):
        track[t] = env.sim.flange_position()
    return track


def push_test(env: ArmTrackingEnv, make_policy: Callable[[], AdaptivePolicy | None],
              seed: int = 0, task: TaskParams | None = None,
              force_n: tuple[float, float, float] = DEFAULT_FORCE_N,
              start_s: float = DEFAULT_START_S, duration_s: float = DEFAULT_DURATION_S,
              observe_s: float = DEFAULT_OBSERVE_S) -> PushResult:
    """Peak flange deflection of the controller ``make_policy()`` under a push.

    ``make_policy`` is called once per run, so each run starts from a fresh controller
    (return ``None`` for the env's PD feedback alone). ``task`` is the robot's condition
    (default: the env's default task, the intact arm).
    """
    force = np.asarray(force_n, dtype=np.float64)
    magnitude = float(np.linalg.norm(force))
    if not magnitude > 0 or not duration_s > 0 or start_s < 0:
        raise ValueError("push_test needs a non-zero force, a positive duration and start >= 0")
    dt = env.setup.control_dt
    steps = int(round((start_s + observe_s) / dt))
    free = _flange_track(env, make_policy(), seed, task, steps, None)
    pushed = _flange_track(env, make_policy(), seed, task, steps, (force, start_s, duration_s))
    first = int(round(start_s / dt))
    deflection = np.linalg.norm(pushed[first:] - free[first:], axis=1) * 1e3
    peak = float(deflection.max())
    return PushResult(peak_deflection_mm=peak, force_n=magnitude,
                      stiffness_n_per_mm=magnitude / peak if peak > 0 else float("inf"),
                      deflection_mm=deflection)


def method_compliance(spec, models: dict, setup, seeds: int = 3) -> dict:
    """The push test of one evaluation method on the intact arm (``evaluate``'s compliance
    hook): mean peak deflection (mm) and stiffness (N/mm) over ``seeds`` references.

    Learned methods run with their context posterior and their parameter adaptation (it acts
    every tick); the MAML correction is left out (it adapts at 10 Hz, slower than the push's
    0.3 s). ``spec`` is an
    :mod:`metarl_ros.evaluation.methods` spec, ``models`` maps model names to model.pt paths.
    """
    from metarl_ros.evaluation.methods import PolicyMethod

    if isinstance(spec, PolicyMethod):
        def make():
            policy = spec.build(setup)
            if spec.privileged:
                policy.set_task(TaskParams())
            return policy
    else:
        from metarl_ros.learning.saved_model import load_model
        from metarl_ros.policy.torch_policy import TorchAdaptivePolicy

        if spec.model not in models:
            return {"status": f"not measured (no {spec.model} model)"}
        loaded = load_model(models[spec.model])
        if loaded.agent.spec.conditioning == "oracle":
            return {"status": "not measured (the oracle's condition is the true task, which "
                              "the push test does not model)"}

        def make():
            policy = TorchAdaptivePolicy(loaded)
            if spec.parameter_adaptation is None:
                return policy
            from metarl_ros.policy.parameter_adaptation import ParameterAdaptationPolicy

            return ParameterAdaptationPolicy(policy, setup.law, spec.parameter_adaptation)
    env = ArmTrackingEnv(setup)
    try:
        peaks = [push_test(env, make, seed=seed).peak_deflection_mm for seed in range(seeds)]
    finally:
        env.close()
    peak = float(np.mean(peaks))
    force = float(np.linalg.norm(DEFAULT_FORCE_N))
    return {"peak_deflection_mm": round(peak, 3), "stiffness_n_per_mm": round(force / peak, 3),
            "push": {"force_n": list(DEFAULT_FORCE_N), "duration_s": DEFAULT_DURATION_S,
                     "seeds": seeds, "maml_correction": False,
                     "parameter_adaptation": getattr(spec, "parameter_adaptation", None)
                     is not None}}
