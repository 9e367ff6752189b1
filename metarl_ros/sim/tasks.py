"""Tasks: the physical parameters a robot can have, how they are sampled, and the splits.

A *task* (:class:`TaskParams`) is one physical condition of the robot: payload at the flange,
per-joint motor strength, locked joints, joint friction and damping, sensor noise and actuator
delay. The simulator can switch task at any step, which is how faults strike mid-episode
(:class:`FaultEvent`).

Task distributions and the ``train`` / ``heldout`` / ``ood`` splits are described in YAML
(``sim/tasks/*.yaml``, schema :class:`TaskSuiteConfig`). Splits are reproducible from their
seed; ``heldout`` uses the training ranges with a different seed and is checked to share no task
with ``train``; ``ood`` uses its own (wider, harder) distribution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from metarl_ros.core.schema import ConfigError, StrictModel, load_yaml_model

SplitName = Literal["train", "heldout", "ood"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "heldout", "ood")


@dataclass(frozen=True)
class TaskParams:
    """Physical parameters of one task. Per-joint tuples follow the robot's joint order."""

    payload_mass: float = 0.0
    """kg, point mass attached to the flange."""
    payload_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """m, payload position in the flange frame."""
    motor_strength: tuple[float, ...] = ()
    """fraction of nominal torque each motor delivers (1 = healthy); empty = all healthy."""
    locked_joints: tuple[int, ...] = ()
    """indices of joints held by their brakes (they do not move)."""
    coulomb_friction: tuple[float, ...] = ()
    """N*m, per-joint Coulomb friction; empty = none."""
    viscous_damping: tuple[float, ...] = ()
    """N*m*s/rad, per-joint viscous damping; empty = none."""
    sensor_noise_std: float = 0.0
    """rad (and rad/s for velocities, times 10), std of Gaussian noise on joint readings."""
    actuator_delay_s: float = 0.0
    """s, transport delay between a command and the motors."""

    def normalized(self, num_joints: int) -> "TaskParams":
        """Fill empty per-joint tuples with their neutral values and sort locked joints."""
        return dataclasses.replace(
            self,
            payload_offset=tuple(float(v) for v in self.payload_offset),
            motor_strength=self.motor_strength or (1.0,) * num_joints,
            coulomb_friction=self.coulomb_friction or (0.0,) * num_joints,
            viscous_damping=self.viscous_damping or (0.0,) * num_joints,
            locked_joints=tuple(sorted(set(self.locked_joints))),
        )

    def validate(self, num_joints: int) -> None:
        """Raise ``ValueError`` naming the field if a parameter is impossible."""
        if not np.isfinite(self.payload_mass) or self.payload_mass < 0:
            raise ValueError(f"payload_mass must be >= 0, got {self.payload_mass}")
        if len(self.payload_offset) != 3:
            raise ValueError("payload_offset must have 3 entries")
        for name in ("motor_strength", "coulomb_friction", "viscous_damping"):
            values = getattr(self, name)
            if values and len(values) != num_joints:
                raise ValueError(f"{name} has {len(values)} entries, robot has {num_joints}")
            if any((not np.isfinite(v)) or v < 0 for v in values):
                raise ValueError(f"{name} entries must be finite and >= 0")
        if any(v > 1.0 for v in self.motor_strength):
            raise ValueError("motor_strength entries must be <= 1")
        for j in self.locked_joints:
            if not 0 <= j < num_joints:
                raise ValueError(f"locked joint index {j} out of range [0, {num_joints})")
        if self.sensor_noise_std < 0 or self.actuator_delay_s < 0:
            raise ValueError("sensor_noise_std and actuator_delay_s must be >= 0")

    def oracle_vector(self, num_joints: int) -> np.ndarray:
        """Fixed-length, roughly unit-scaled encoding for oracle baselines and diagnostics.

        Layout: ``[mass/5, offset*10 (3), strength (n), locked mask (n), coulomb/2 (n),
        damping*2 (n), noise*1000, delay*200]``, length ``4*n + 6``.
        """
        task = self.normalized(num_joints)
        locked = np.zeros(num_joints)
        locked[list(task.locked_joints)] = 1.0
        return np.concatenate(
            [
                [task.payload_mass / 5.0],
                np.asarray(task.payload_offset) * 10.0,
                task.motor_strength,
                locked,
                np.asarray(task.coulomb_friction) / 2.0,
                np.asarray(task.viscous_damping) * 2.0,
                [task.sensor_noise_std * 1000.0, task.actuator_delay_s * 200.0],
            ]
        ).astype(np.float32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TaskParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown task parameter(s): {sorted(unknown)}")
        values = dict(data)
        for key in (
            "payload_offset",
            "motor_strength",
            "locked_joints",
            "coulomb_friction",
            "viscous_damping",
        ):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def key(self) -> str:
        """Stable identity of the task (used to prove splits are disjoint)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def oracle_vector_size(num_joints: int) -> int:
    return 4 * num_joints + 6


@dataclass(frozen=True, order=True)
class FaultEvent:
    """At simulation time ``time_s`` the robot's physical parameters become ``task``."""

    time_s: float
    task: TaskParams = field(compare=False)
    label: str = field(default="fault", compare=False)


# --------------------------------------------------------------------------------------------
# Distribution config (YAML)


class Range(StrictModel):
    """A closed interval sampled uniformly."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self

    def sample(self, rng: np.random.Generator, size: int | None = None):
        return rng.uniform(self.low, self.high, size=size)


class TaskDistributionConfig(StrictModel):
    """How tasks of one distribution are drawn. Joint indices are 0-based."""

    payload_probability: float = Field(ge=0.0, le=1.0)
    payload_mass_kg: Range
    payload_offset_m: Range = Field(description="each flange-frame component, uniform")
    damage_probability: float = Field(ge=0.0, le=1.0)
    damageable_joints: list[NonNegativeInt]
    max_damaged_joints: PositiveInt = 1
    motor_strength: Range
    lock_probability: float = Field(ge=0.0, le=1.0)
    lockable_joints: list[NonNegativeInt] = []
    coulomb_friction_nm: Range
    viscous_damping_nms: Range
    sensor_noise_std: Range
    actuator_delay_s: Range

    @model_validator(mode="after")
    def _check(self) -> "TaskDistributionConfig":
        if self.motor_strength.low < 0 or self.motor_strength.high > 1:
            raise ValueError("motor_strength must lie within [0, 1]")
        if self.payload_mass_kg.low < 0:
            raise ValueError("payload_mass_kg must be >= 0")
        for name in (
            "coulomb_friction_nm",
            "viscous_damping_nms",
            "sensor_noise_std",
            "actuator_delay_s",
        ):
            if getattr(self, name).low < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.damage_probability > 0 and not self.damageable_joints:
            raise ValueError("damageable_joints is empty but damage_probability > 0")
        if self.lock_probability > 0 and not self.lockable_joints:
            raise ValueError("lockable_joints is empty but lock_probability > 0")
        return self


class SplitConfig(StrictModel):
    distribution: str
    num_tasks: PositiveInt
    seed: NonNegativeInt
    include_nominal: bool = Field(
        default=False, description="make task 0 the intact robot without payload"
    )


class TaskSuiteConfig(StrictModel):
    """``sim/tasks/*.yaml``: named distributions and the three splits drawn from them."""

    distributions: dict[str, TaskDistributionConfig]
    splits: dict[SplitName, SplitConfig]
    fault_time_s: Range = Field(description="when the mid-episode fault strikes in evaluation")

    @model_validator(mode="after")
    def _check(self) -> "TaskSuiteConfig":
        missing = [s for s in SPLIT_NAMES if s not in self.splits]
        if missing:
            raise ValueError(f"splits is missing {missing}")
        for name, split in self.splits.items():
            if split.distribution not in self.distributions:
                raise ValueError(
                    f"splits.{name}.distribution: unknown distribution {split.distribution!r} "
                    f"(defined: {sorted(self.distributions)})"
                )
        if self.fault_time_s.low <= 0:
            raise ValueError("fault_time_s must be > 0")
        return self


def load_task_suite(path: str | Path) -> TaskSuiteConfig:
    return load_yaml_model(TaskSuiteConfig, path)


def sample_task(
    dist: TaskDistributionConfig, rng: np.random.Generator, friction_scale: np.ndarray
) -> TaskParams:
    """Draw one task from ``dist``.

    Per-joint friction and damping are scaled by ``friction_scale``.
    """
    num_joints = len(friction_scale)
    for j in list(dist.damageable_joints) + list(dist.lockable_joints):
        if j >= num_joints:
            raise ConfigError(f"joint index {j} in task distribution exceeds robot ({num_joints})")
    payload_mass = 0.0
    payload_offset = (0.0, 0.0, 0.0)
    if rng.random() < dist.payload_probability:
        payload_mass = float(dist.payload_mass_kg.sample(rng))
        payload_offset = tuple(float(v) for v in dist.payload_offset_m.sample(rng, size=3))
    strength = np.ones(num_joints)
    if rng.random() < dist.damage_probability:
        count = int(rng.integers(1, min(dist.max_damaged_joints, len(dist.damageable_joints)) + 1))
        joints = rng.choice(dist.damageable_joints, size=count, replace=False)
        strength[joints] = dist.motor_strength.sample(rng, size=count)
    locked: tuple[int, ...] = ()
    if rng.random() < dist.lock_probability:
        locked = (int(rng.choice(dist.lockable_joints)),)
    return TaskParams(
        payload_mass=payload_mass,
        payload_offset=payload_offset,  # type: ignore[arg-type]
        motor_strength=tuple(float(v) for v in strength),
        locked_joints=locked,
        coulomb_friction=tuple(
            float(v) for v in dist.coulomb_friction_nm.sample(rng, num_joints) * friction_scale
        ),
        viscous_damping=tuple(
            float(v) for v in dist.viscous_damping_nms.sample(rng, num_joints) * friction_scale
        ),
        sensor_noise_std=float(dist.sensor_noise_std.sample(rng)),
        actuator_delay_s=float(dist.actuator_delay_s.sample(rng)),
    )


def nominal_task(num_joints: int) -> TaskParams:
    """The intact robot without payload."""
    return TaskParams().normalized(num_joints)


def make_split(
    suite: TaskSuiteConfig, split: SplitName, friction_scale: list[float] | np.ndarray
) -> list[TaskParams]:
    """Draw the tasks of ``split``. Deterministic given the YAML.

    ``friction_scale`` is the robot's per-joint friction multiplier (its length is the number
    of joints).

    ``heldout`` re-draws any task that also occurs in ``train`` so the two never overlap.
    """
    config = suite.splits[split]
    dist = suite.distributions[config.distribution]
    rng = np.random.default_rng(config.seed)
    friction_scale = np.asarray(friction_scale, dtype=np.float64)
    num_joints = len(friction_scale)
    forbidden: set[str] = set()
    if split == "heldout":
        forbidden = {t.key() for t in make_split(suite, "train", friction_scale)}
    tasks: list[TaskParams] = [nominal_task(num_joints)] if config.include_nominal else []
    attempts = 0
    while len(tasks) < config.num_tasks:
        attempts += 1
        if attempts > 100 * config.num_tasks:
            raise ConfigError(f"split {split!r}: cannot draw {config.num_tasks} distinct tasks")
        task = sample_task(dist, rng, friction_scale).normalized(num_joints)
        if task.key() in forbidden or task.key() in {t.key() for t in tasks}:
            continue
        tasks.append(task)
    return tasks


@dataclass(frozen=True)
class FaultEpisode:
    """One evaluation episode: the intact robot, then ``task`` strikes at ``fault_time_s``."""

    task_index: int
    task: TaskParams
    fault_time_s: float
    seed: int

    def faults(self) -> list[FaultEvent]:
        return [FaultEvent(self.fault_time_s, self.task, label="fault")]


def fault_episodes(
    suite: TaskSuiteConfig, tasks: list[TaskParams], episodes: int, seed: int
) -> list[FaultEpisode]:
    """The evaluation protocol: ``episodes`` episodes cycling through ``tasks``; each starts on
    the intact robot and the task strikes at a time drawn from ``suite.fault_time_s``.
    Deterministic given ``seed``, so every method sees the same episodes."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    rng = np.random.default_rng(seed)
    return [
        FaultEpisode(
            task_index=i % len(tasks),
            task=tasks[i % len(tasks)],
            fault_time_s=float(suite.fault_time_s.sample(rng)),
            seed=int(rng.integers(0, 2**31 - 1)),
        )
        for i in range(episodes)
    ]
