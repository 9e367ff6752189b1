"""What each fault costs a controller that does not adapt, against the physical ceiling.

Evidence for the control problem (docs/ENVIRONMENT.md): per fault family, the post-fault RMS
tracking error (mrad) of

* ``pd``       -- the env's PD feedback alone;
* ``nominal``  -- the PD plus the *nominal* model's feed-forward (computed torque at the PD's
  compliance, told nothing about the fault): what a controller that does not adapt gets
  without stiffening;
* ``ceiling``  -- the same with the *true* faulted model (privileged): what adapting could
  reach at that compliance,

and the headroom ratio nominal / ceiling (the issue's bar: >= 3). Faults strike at 1.5 s of a
4 s episode; every method sees the same references (seeds) and tasks.

    python benchmarks/control_problem.py                      # the env's references
    python benchmarks/control_problem.py --frequency 0.3 0.8  # faster references
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from metarl_ros.evaluation.episode import policy_steps
from metarl_ros.policy.computed_torque import computed_torque_policy
from metarl_ros.sim.env import ArmTrackingEnv
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.tasks import FaultEvent, TaskParams

FAULT_S = 1.5


def family_tasks(rng: np.random.Generator, count: int) -> dict[str, list[TaskParams]]:
    """Single-family faults from the training ranges (sim/tasks/iiwa7_faults.yaml, in_range)."""
    def strengths() -> tuple[float, ...]:
        s = np.ones(7)
        for j in rng.choice(4, size=rng.integers(1, 3), replace=False):
            s[j] = rng.uniform(0.4, 1.0)
        return tuple(s)

    return {
        "payload": [TaskParams(payload_mass=float(rng.uniform(0.5, 3.0)),
                               payload_offset=tuple(rng.uniform(-0.05, 0.05, 3)))
                    for _ in range(count)],
        "motor": [TaskParams(motor_strength=strengths()) for _ in range(count)],
        "friction": [TaskParams(coulomb_friction=tuple(rng.uniform(0, 1.5, 7)),
                                viscous_damping=tuple(rng.uniform(0, 0.5, 7)))
                     for _ in range(count)],
        "delay": [TaskParams(actuator_delay_s=float(rng.uniform(0.002, 0.004)))
                  for _ in range(count)],
    }


def post_fault_rms_mrad(env: ArmTrackingEnv, policy, seed: int, task: TaskParams) -> float:
    obs, _ = env.reset(seed=seed, options={"faults": [FaultEvent(FAULT_S, task, "fault")]})
    if policy is not None:
        policy.reset()
    errors = [step.info["tracking_error"]
              for t, step in enumerate(policy_steps(env, policy, obs, env.setup.episode_steps))
              if (t + 1) * env.setup.control_dt > FAULT_S]
    return float(np.sqrt(np.mean(np.square(errors))) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=6, help="tasks per family")
    parser.add_argument("--frequency", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="reference frequency band (Hz); default: the env's")
    args = parser.parse_args()
    setup = load_env_setup()
    if args.frequency:
        reference = setup.config.reference.model_copy(update={
            "frequency_low_hz": args.frequency[0], "frequency_high_hz": args.frequency[1]})
        setup = dataclasses.replace(
            setup, config=setup.config.model_copy(update={"reference": reference}))
    ref = setup.config.reference
    print(f"references {ref.frequency_low_hz}-{ref.frequency_high_hz} Hz, "
          f"PD kp {setup.config.feedback.kp}")
    env = ArmTrackingEnv(setup)
    nominal = computed_torque_policy(setup)
    ceiling = computed_torque_policy(setup, task_source=lambda: env.true_task)
    print(f"{'family':10s} {'pd':>8s} {'nominal':>8s} {'ceiling':>8s} {'headroom':>9s}  (mrad)")
    tasks = family_tasks(np.random.default_rng(0), args.episodes)
    for family, family_tasks_ in tasks.items():
        rows = np.array([[post_fault_rms_mrad(env, policy, seed, task)
                          for policy in (None, nominal, ceiling)]
                         for seed, task in enumerate(family_tasks_)])
        pd, nom, ceil = rows.mean(axis=0)
        print(f"{family:10s} {pd:8.2f} {nom:8.2f} {ceil:8.2f} {nom / ceil:8.1f}x")
    env.close()


if __name__ == "__main__":
    main()
