"""Fault suites: one fault family each, in range and beyond training, in two disjoint draws.

A suite (``sim/suites/*.yaml``, schema :class:`FaultSuiteConfig`) names a fault *family*
(payload, motor weakness, ...) and its *conditions*: each a distribution of tasks, labelled
``in_range`` (every parameter within the training distribution) or ``beyond`` (some parameter
outside it: heavier, weaker, slower, or a joint training never damages). A condition is written
either as the family's faults (:class:`FaultSpec`; everything not named stays intact) or as a
reference to a distribution of a task file (``distribution_of``: the combined mix).

Every suite has two **draws** of tasks and episodes, from their own seeds:

* ``validation``: every choice (a threshold, a gate, a gain, a hyperparameter) is made on it,
  and only on it;
* ``report``: the numbers that are published; no choice ever looks at it.

The report draw shares no task (:meth:`TaskParams.key`) and no episode seed with the validation
draw: it re-draws a colliding task (as the ``heldout`` split does against ``train``), skips a
colliding seed, and :func:`check_disjoint` proves it. Draws are deterministic given the YAML.
A condition with only a few possible tasks (which joint locks) says ``repeat_tasks: true``: its
tasks repeat within and across draws, its episodes (reference, fault time, noise) do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from metarl_ros.core.resources import resolve_path, share_directory
from metarl_ros.core.schema import ConfigError, StrictModel, load_yaml_model
from metarl_ros.sim.tasks import (
    FaultEpisode,
    Range,
    TaskDistributionConfig,
    TaskParams,
    load_task_suite,
    sample_task,
)

DrawName = Literal["validation", "report"]
DRAW_NAMES: tuple[DrawName, ...] = ("validation", "report")
SUITE_FOLDER = "sim/suites"
_ZERO = Range(low=0.0, high=0.0)


class PayloadFault(StrictModel):
    """A point mass at the flange."""

    mass_kg: Range
    offset_m: Range = Field(default=_ZERO, description="each flange-frame component, uniform")


class MotorFault(StrictModel):
    """1..``max_joints`` of ``joints`` (0-based) deliver a fraction ``strength`` of torque."""

    joints: list[NonNegativeInt] = Field(min_length=1)
    max_joints: PositiveInt = 1
    strength: Range


class LockFault(StrictModel):
    """One of ``joints`` is held by its brake."""

    joints: list[NonNegativeInt] = Field(min_length=1)


class FrictionFault(StrictModel):
    """Per-joint Coulomb friction and viscous damping (times the robot's friction scale)."""

    coulomb_nm: Range = _ZERO
    damping_nms: Range = _ZERO


class FaultSpec(StrictModel):
    """The faults of one condition; each named block always strikes, the rest stays intact."""

    payload: PayloadFault | None = None
    motor: MotorFault | None = None
    lock: LockFault | None = None
    friction: FrictionFault | None = None
    actuator_delay_s: Range | None = None
    sensor_noise_std: Range | None = Field(default=None, description="rad")

    def distribution(self) -> TaskDistributionConfig:
        """The same faults as a task distribution (drawn by :func:`sample_task`)."""
        motor, lock, friction = self.motor, self.lock, self.friction or FrictionFault()
        return TaskDistributionConfig(
            payload_probability=1.0 if self.payload else 0.0,
            payload_mass_kg=self.payload.mass_kg if self.payload else _ZERO,
            payload_offset_m=self.payload.offset_m if self.payload else _ZERO,
            damage_probability=1.0 if motor else 0.0,
            damageable_joints=list(motor.joints) if motor else [],
            max_damaged_joints=motor.max_joints if motor else 1,
            motor_strength=motor.strength if motor else Range(low=1.0, high=1.0),
            lock_probability=1.0 if lock else 0.0,
            lockable_joints=list(lock.joints) if lock else [],
            coulomb_friction_nm=friction.coulomb_nm,
            viscous_damping_nms=friction.damping_nms,
            sensor_noise_std=self.sensor_noise_std or _ZERO,
            actuator_delay_s=self.actuator_delay_s or _ZERO,
        )


class DistributionRef(StrictModel):
    """A distribution of a task file (``sim/tasks/*.yaml``), path relative to the suite."""

    file: str
    distribution: str


class SuiteCondition(StrictModel):
    scope: Literal["in_range", "beyond"] = Field(
        description="in_range: within the training distribution; beyond: outside it somewhere"
    )
    description: str
    faults: FaultSpec | None = None
    distribution_of: DistributionRef | None = None
    repeat_tasks: bool = Field(
        default=False,
        description="the condition has few possible tasks (e.g. which joint locks): a draw "
        "samples them with replacement and both draws may hold the same tasks; they stay "
        "disjoint in episodes, and statistics treat equal tasks as one",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "SuiteCondition":
        if (self.faults is None) == (self.distribution_of is None):
            raise ValueError("give exactly one of faults and distribution_of")
        return self


class DrawConfig(StrictModel):
    seed: NonNegativeInt
    tasks_per_condition: PositiveInt
    episodes_per_task: PositiveInt = 2


class FaultSuiteConfig(StrictModel):
    """``sim/suites/*.yaml`` (layout and draws: module doc)."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    family: str
    description: str
    fault_time_s: Range = Field(default=Range(low=1.5, high=2.5),
                                description="when the fault strikes the intact robot")
    conditions: dict[str, SuiteCondition] = Field(min_length=1)
    draws: dict[DrawName, DrawConfig]

    @model_validator(mode="after")
    def _check(self) -> "FaultSuiteConfig":
        missing = [d for d in DRAW_NAMES if d not in self.draws]
        if missing:
            raise ValueError(f"draws is missing {missing} (both validation and report)")
        if self.draws["validation"].seed == self.draws["report"].seed:
            raise ValueError("draws.validation.seed and draws.report.seed must differ")
        if self.fault_time_s.low <= 0:
            raise ValueError("fault_time_s must be > 0")
        return self


@dataclass(frozen=True)
class FaultSuite:
    """A loaded suite: its config, its file, and each condition as a task distribution."""

    config: FaultSuiteConfig
    path: Path
    distributions: dict[str, TaskDistributionConfig]

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class DrawnSuite:
    """One draw of a suite: its tasks and episodes.

    ``episodes[i].task_index`` indexes ``tasks``; ``task_condition[k]`` names the condition of
    task ``k``. Episodes are ordered by condition, then task.
    """

    suite: str
    family: str
    draw: str
    conditions: dict[str, str]  # condition -> scope
    repeating: frozenset[str]  # conditions whose tasks may repeat (``repeat_tasks``)
    tasks: list[TaskParams]
    task_condition: list[str]
    episodes: list[FaultEpisode]

    def condition_of(self, episode: FaultEpisode) -> str:
        return self.task_condition[episode.task_index]


def load_suite(path: str | Path) -> FaultSuite:
    """Load and validate a suite file; ``distribution_of`` files resolve against its folder."""
    path = resolve_path(path)
    config = load_yaml_model(FaultSuiteConfig, path)
    distributions = {}
    for name, condition in config.conditions.items():
        if condition.faults is not None:
            distributions[name] = condition.faults.distribution()
            continue
        ref = condition.distribution_of
        assert ref is not None
        tasks = load_task_suite(resolve_path(ref.file, base=path.parent))
        if ref.distribution not in tasks.distributions:
            raise ConfigError(
                f"{path}: conditions.{name}.distribution_of: {ref.file} has no distribution "
                f"{ref.distribution!r} (defined: {sorted(tasks.distributions)})"
            )
        distributions[name] = tasks.distributions[ref.distribution]
    return FaultSuite(config, path, distributions)


def shipped_suites() -> dict[str, Path]:
    """The suites shipped in ``sim/suites/``, by name (file stem)."""
    folder = share_directory() / SUITE_FOLDER
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_suite(name: str) -> Path:
    suites = shipped_suites()
    if name not in suites:
        raise ConfigError(f"no fault suite {name!r}; shipped: {sorted(suites)}")
    return suites[name]


def _draw(
    suite: FaultSuite,
    draw: DrawName,
    friction_scale: np.ndarray,
    forbidden_tasks: set[str],
    forbidden_seeds: set[int],
    tasks_per_condition: int | None,
) -> DrawnSuite:
    config = suite.config
    spec = config.draws[draw]
    count = tasks_per_condition or spec.tasks_per_condition
    num_joints = len(friction_scale)
    tasks: list[TaskParams] = []
    task_condition: list[str] = []
    episodes: list[FaultEpisode] = []
    for c, (name, dist) in enumerate(suite.distributions.items()):
        task_rng = np.random.default_rng([spec.seed, c, 0])
        episode_rng = np.random.default_rng([spec.seed, c, 1])
        repeat = config.conditions[name].repeat_tasks
        keys = set(forbidden_tasks) | {t.key() for t in tasks}
        drawn = 0
        for _ in range(100 * count):
            if drawn == count:
                break
            task = sample_task(dist, task_rng, friction_scale).normalized(num_joints)
            if task.key() in keys and not repeat:
                continue
            keys.add(task.key())
            tasks.append(task)
            task_condition.append(name)
            drawn += 1
            for _ in range(spec.episodes_per_task):
                seed = int(episode_rng.integers(0, 2**31 - 1))
                while seed in forbidden_seeds:
                    seed = int(episode_rng.integers(0, 2**31 - 1))
                episodes.append(FaultEpisode(
                    task_index=len(tasks) - 1,
                    task=task,
                    fault_time_s=float(config.fault_time_s.sample(episode_rng)),
                    seed=seed,
                ))
        if drawn < count:
            raise ConfigError(f"{suite.path}: condition {name!r}: cannot draw {count} "
                              f"distinct tasks")
    return DrawnSuite(
        suite=config.name,
        family=config.family,
        draw=draw,
        conditions={k: v.scope for k, v in config.conditions.items()},
        repeating=frozenset(k for k, v in config.conditions.items() if v.repeat_tasks),
        tasks=tasks,
        task_condition=task_condition,
        episodes=episodes,
    )


def draw_suite(
    suite: FaultSuite,
    draw: DrawName,
    friction_scale: list[float] | np.ndarray,
    tasks_per_condition: int | None = None,
) -> DrawnSuite:
    """The tasks and episodes of ``draw`` for a robot with ``friction_scale`` (one per joint).

    ``tasks_per_condition`` overrides the YAML's count; the first tasks of a draw do not depend
    on it (a smaller count evaluates a prefix). The report draw avoids every task and episode
    seed of the validation draw (drawn with the YAML's count).
    """
    scale = np.asarray(friction_scale, dtype=np.float64)
    if draw not in DRAW_NAMES:
        raise ConfigError(f"unknown draw {draw!r}; choose from {list(DRAW_NAMES)}")
    tasks: set[str] = set()
    seeds: set[int] = set()
    if draw == "report":
        validation = _draw(suite, "validation", scale, set(), set(), None)
        tasks = {t.key() for t in validation.tasks}
        seeds = {e.seed for e in validation.episodes}
    return _draw(suite, draw, scale, tasks, seeds, tasks_per_condition)


def check_disjoint(validation: DrawnSuite, report: DrawnSuite) -> None:
    """Raise :class:`ConfigError` if the two draws share a task (outside ``repeat_tasks``
    conditions) or an episode seed."""

    def keys(drawn: DrawnSuite) -> set[str]:
        return {t.key() for t, c in zip(drawn.tasks, drawn.task_condition)
                if c not in drawn.repeating}

    shared_tasks = keys(validation) & keys(report)
    shared_seeds = {e.seed for e in validation.episodes} & {e.seed for e in report.episodes}
    if shared_tasks or shared_seeds:
        raise ConfigError(
            f"suite {report.suite}: validation and report draws share {len(shared_tasks)} "
            f"task(s) and {len(shared_seeds)} episode seed(s)"
        )


def outside_training(
    dist: TaskDistributionConfig, training: TaskDistributionConfig
) -> list[str]:
    """The parameters of ``dist`` that can take values the ``training`` distribution never
    draws (empty: ``dist`` lies within training). Only parameters that ``dist`` actually
    draws count (a payload range with ``payload_probability`` 0 does not)."""

    def beyond(name: str) -> bool:
        inner, outer = getattr(dist, name), getattr(training, name)
        return inner.low < outer.low - 1e-12 or inner.high > outer.high + 1e-12

    out = []
    if dist.payload_probability > 0:
        if training.payload_probability == 0:
            out.append("payload")
        out += [n for n in ("payload_mass_kg", "payload_offset_m") if beyond(n)]
    if dist.damage_probability > 0:
        if training.damage_probability == 0 or beyond("motor_strength"):
            out.append("motor_strength")
        if not set(dist.damageable_joints) <= set(training.damageable_joints):
            out.append("damageable_joints")
        if dist.max_damaged_joints > training.max_damaged_joints:
            out.append("max_damaged_joints")
    if dist.lock_probability > 0:
        if training.lock_probability == 0 or not set(dist.lockable_joints) <= set(
            training.lockable_joints
        ):
            out.append("lockable_joints")
    out += [
        n for n in ("coulomb_friction_nm", "viscous_damping_nms", "sensor_noise_std",
                    "actuator_delay_s")
        if beyond(n)
    ]
    return out
