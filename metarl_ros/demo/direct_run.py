"""``metarl demo --no-ros``: the same scenario on the Gymnasium env directly, no DDS.

A cross-check of the node graph: in lockstep the simulator node steps exactly like the env,
and the adapter node runs MAML inline every ``adapt_every`` transitions as here
(``adaptation_schedule: inline``, which the graph picks for lockstep), so both paths give the
same numbers.
"""

from __future__ import annotations

import numpy as np

from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.evaluation.episode import policy_steps
from metarl_ros.evaluation.trace import Trace
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.scenario import Scenario


def run_env(env: ArmTrackingEnv, scenario: Scenario, duration_s: float,
            policy: AdaptivePolicy | None) -> Trace:
    """One run of ``scenario``; ``policy=None`` is the env's PD feedback alone (zero action).

    Sample ``t`` is the state after step ``t``, at ``(t + 1) * control_dt``, like the
    simulator node's stamps.
    """
    dt = env.setup.control_dt
    steps = int(round(duration_s / dt))
    obs, _ = env.reset(seed=scenario.config.reference_seed,
                       options={"task": scenario.initial_task, "faults": list(scenario.events)})
    if policy is not None:
        policy.reset()
    errors = np.zeros(steps)
    latent = np.zeros(steps)
    events: list[tuple[float, str]] = []
    for t, step in enumerate(policy_steps(env, policy, obs, steps)):
        if policy is not None:
            latent[t] = float(np.linalg.norm(policy.posterior().mean))
        errors[t] = step.info["tracking_error"]
        events += [(event.time_s, event.label) for event in scenario.events
                   if event.label in step.info["faults"]]
    times = (np.arange(steps) + 1) * dt
    has_latent = policy is not None and policy.posterior().mean.size > 0
    return Trace(times, errors, times if has_latent else np.zeros(0),
                 latent if has_latent else np.zeros(0), tuple(events))
