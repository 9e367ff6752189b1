"""``metarl demo``: the shipped model through the default fault scenario, adaptation off vs on.

The arm tracks its reference on the intact robot, picks up a payload, later loses most of a
motor's torque (``config/scenarios/default.yaml``). The same run is repeated with:

* ``pd``: the fixed PD feedback alone (the classical controller the policy acts on top of);
* ``no_adaptation``: the PEARL policy with its latent frozen at the prior (it never updates
  its context);
* ``pearl``: the streaming posterior over the last 0.25 s;
* ``pearl_maml``: PEARL plus the MAML-adapted dynamics correction.

It prints the tracking error before the faults, right after each one and once adapted, and
writes ``summary.json`` and ``tracking_error.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metarl_ros.resources import resolve_path
from metarl_ros.runtime import AdaptivePolicy
from metarl_ros.scenario import Scenario, load_scenario
from metarl_ros.sim.env import ArmTrackingEnv, load_env_setup

RIGHT_AFTER_S = 0.5
ADAPTED_S = 1.0


class _FrozenContext:
    """Wraps a policy so that it never sees transitions: adaptation off."""

    def __init__(self, policy: AdaptivePolicy) -> None:
        self.policy = policy
        self.contract = policy.contract

    def reset(self) -> None:
        self.policy.reset()

    def observe(self, obs, action, reward, next_obs) -> None:
        pass

    def act(self, obs):
        return self.policy.act(obs)

    def posterior(self):
        return self.policy.posterior()


def run_scenario(env: ArmTrackingEnv, scenario: Scenario, policy: AdaptivePolicy | None) -> dict:
    """One run; ``policy=None`` is the PD feedback alone. Returns per-step arrays."""
    steps = int(round(scenario.config.duration_s / env.setup.control_dt))
    obs, _ = env.reset(
        seed=scenario.config.reference_seed,
        options={"task": scenario.initial_task, "faults": list(scenario.events)},
    )
    if policy is not None:
        policy.reset()
    errors = np.zeros(steps)
    latent_norm = np.zeros(steps)
    zero = np.zeros(env.action_space.shape, np.float32)
    for t in range(steps):
        action = zero if policy is None else policy.act(obs)
        next_obs, reward, _, _, info = env.step(action)
        if policy is not None:
            policy.observe(obs, action, reward, next_obs)
            latent_norm[t] = float(np.linalg.norm(policy.posterior().mean))
        errors[t] = info["tracking_error"]
        obs = next_obs
    return {"tracking_error": errors, "latent_norm": latent_norm}


def phase_errors(errors: np.ndarray, scenario: Scenario, dt: float) -> dict:
    """Mean tracking error before the first event and, per event, right after and adapted."""
    times = [event.time_s for event in scenario.events]
    first = int(round(times[0] / dt)) if times else len(errors)
    phases = {"before_faults": float(errors[int(round(1.0 / dt)) : first].mean())}
    ends = times[1:] + [scenario.config.duration_s]
    for event, end in zip(scenario.events, ends):
        start = int(round(event.time_s / dt))
        stop = int(round(end / dt))
        phases[event.label] = {
            "right_after": float(errors[start : start + int(RIGHT_AFTER_S / dt)].mean()),
            "adapted": float(errors[max(start, stop - int(ADAPTED_S / dt)) : stop].mean()),
        }
    return phases


def plot(results: dict, scenario: Scenario, dt: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, result in results.items():
        t = np.arange(len(result["tracking_error"])) * dt
        ax.plot(t, result["tracking_error"], label=name, linewidth=1.2)
    for event in scenario.events:
        ax.axvline(event.time_s, color="k", linestyle="--", linewidth=0.8)
        ax.text(event.time_s, ax.get_ylim()[1] * 0.95, " " + event.label, fontsize=8, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("time [s]")
    ax.set_ylabel("tracking error ||q_ref - q|| [rad]")
    ax.set_title(f"scenario {scenario.config.name}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_command(args: argparse.Namespace) -> int:
    import torch

    from metarl_ros.learning.runtime import TorchAdaptivePolicy, load_model

    torch.set_num_threads(1)
    model_dir = resolve_path(args.model)
    loaded = load_model(model_dir / "pearl" / "model.pt")
    setup = load_env_setup(loaded.payload["env_config"])
    scenario_path = resolve_path("config/scenarios/default.yaml")
    scenario = load_scenario(scenario_path, setup.robot.joint_names)
    env = ArmTrackingEnv(setup)
    controllers: dict[str, AdaptivePolicy | None] = {
        "pd": None,
        "no_adaptation": _FrozenContext(TorchAdaptivePolicy(loaded)),
        "pearl": TorchAdaptivePolicy(loaded),
        "pearl_maml": TorchAdaptivePolicy(loaded, adaptation=True, background=False),
    }
    print(f"scenario {scenario.config.name}: {scenario.config.description.strip()}")
    results, summary = {}, {}
    for name, policy in controllers.items():
        results[name] = run_scenario(env, scenario, policy)
        summary[name] = phase_errors(results[name]["tracking_error"], scenario, setup.control_dt)
    env.close()
    print(
        f"\nmean tracking error ||q_ref - q|| [rad] (right after = first {RIGHT_AFTER_S} s, "
        f"adapted = last {ADAPTED_S} s before the next event)"
    )
    header = f"{'controller':16s}{'before faults':>15s}"
    for event in scenario.events:
        header += f"{'after ' + event.label[:18]:>28s}{'adapted':>10s}"
    print(header)
    for name, phases in summary.items():
        row = f"{name:16s}{phases['before_faults']:15.4f}"
        for event in scenario.events:
            row += (
                f"{phases[event.label]['right_after']:28.4f}{phases[event.label]['adapted']:10.4f}"
            )
        print(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "scenario": scenario.config.name,
                "model": str(model_dir / "pearl" / "model.pt"),
                "tracking_error_rad": summary,
            },
            indent=2,
        )
    )
    plot(results, scenario, setup.control_dt, out / "tracking_error.png")
    print(f"\nwrote {out / 'summary.json'} and {out / 'tracking_error.png'}")
    return 0
