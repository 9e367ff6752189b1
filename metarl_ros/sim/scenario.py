"""Fault scenarios: what happens to the robot, and when, during a simulated run.

A scenario YAML (``config/scenarios/*.yaml``, schema :class:`ScenarioConfig`) gives the task at
the start and a list of timed events. Each event lists **only what changes**; it is applied on
top of the task in force just before it (``base: current``, the default) or on top of the
intact robot (``base: nominal``). Per-joint values are either a full list in the robot's joint
order or a mapping ``joint_name: value`` (the other joints keep their value); locked joints
are given by name (or 0-based index). Times are simulation seconds. Example::

    name: payload_then_damage
    reference_seed: 0
    events:
      - time_s: 3.0
        label: pick up 2.5 kg
        change: {payload_mass: 2.5, payload_offset: [0.0, 0.0, 0.05]}
      - time_s: 7.0
        label: joint 2 motor at 40 %
        change: {motor_strength: {lbr_iiwa_joint_2: 0.4}}

The same change format, as a JSON object, is what the simulator node accepts at run time on
``/sim/set_task`` (``{"label": ..., "base": ..., <change fields>}``, applied at once).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Sequence, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, model_validator

from metarl_ros.core.schema import ConfigError, StrictModel, load_yaml_model, validate_model
from metarl_ros.sim.tasks import FaultEvent, TaskParams

PerJoint = Union[list[NonNegativeFloat], dict[str, NonNegativeFloat]]


class TaskChange(StrictModel):
    """Task parameters that change; unset fields keep their value (see module doc)."""

    payload_mass: NonNegativeFloat | None = Field(default=None, description="kg")
    payload_offset: tuple[float, float, float] | None = Field(
        default=None, description="m, in the flange frame")
    motor_strength: PerJoint | None = Field(default=None, description="fraction, 1 = healthy")
    locked_joints: list[Union[NonNegativeInt, str]] | None = None
    coulomb_friction: PerJoint | None = Field(default=None, description="N*m")
    viscous_damping: PerJoint | None = Field(default=None, description="N*m*s/rad")
    sensor_noise_std: NonNegativeFloat | None = Field(default=None, description="rad")
    actuator_delay_s: NonNegativeFloat | None = None

    def apply(self, base: TaskParams, joint_names: Sequence[str]) -> TaskParams:
        """Return ``base`` with these changes; raise ``ValueError`` naming a bad field."""
        n = len(joint_names)
        base = base.normalized(n)
        index = {name: j for j, name in enumerate(joint_names)}
        values: dict = {}
        for name in ("payload_mass", "sensor_noise_std", "actuator_delay_s"):
            if getattr(self, name) is not None:
                values[name] = float(getattr(self, name))
        if self.payload_offset is not None:
            values["payload_offset"] = tuple(float(v) for v in self.payload_offset)
        for name in ("motor_strength", "coulomb_friction", "viscous_damping"):
            given = getattr(self, name)
            if given is None:
                continue
            if isinstance(given, dict):
                current = list(getattr(base, name))
                for joint, value in given.items():
                    if joint not in index:
                        raise ValueError(f"{name}: unknown joint {joint!r} (robot joints: "
                                         f"{', '.join(joint_names)})")
                    current[index[joint]] = float(value)
                values[name] = tuple(current)
            else:
                if len(given) != n:
                    raise ValueError(f"{name}: {len(given)} entries, robot has {n} joints")
                values[name] = tuple(float(v) for v in given)
        if self.locked_joints is not None:
            locked = []
            for joint in self.locked_joints:
                if isinstance(joint, str):
                    if joint not in index:
                        raise ValueError(f"locked_joints: unknown joint {joint!r}")
                    locked.append(index[joint])
                else:
                    locked.append(int(joint))
            values["locked_joints"] = tuple(sorted(set(locked)))
        task = dataclasses.replace(base, **values)
        task.validate(n)
        return task.normalized(n)


class ScenarioEvent(StrictModel):
    time_s: PositiveFloat = Field(description="simulation time at which the change strikes")
    label: str = ""
    base: Literal["current", "nominal"] = "current"
    change: TaskChange


class ScenarioConfig(StrictModel):
    """``config/scenarios/*.yaml``."""

    name: str
    description: str = ""
    reference_seed: NonNegativeInt = Field(
        default=0, description="seed of the reference trajectory (and the sensor noise)")
    duration_s: PositiveFloat | None = Field(
        default=None, description="run length of `metarl demo` (default --duration); "
                                  "sim_node and `metarl launch` run until stopped")
    initial: TaskChange = Field(default_factory=TaskChange,
                                description="changes to the intact robot at t = 0")
    events: list[ScenarioEvent] = []

    @model_validator(mode="after")
    def _ordered(self) -> "ScenarioConfig":
        times = [event.time_s for event in self.events]
        if times != sorted(times):
            raise ValueError("events must be in order of time_s")
        if self.duration_s is not None and times and times[-1] >= self.duration_s:
            raise ValueError(f"event at t={times[-1]} s is not before duration_s")
        return self


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A scenario resolved against a robot: full tasks, ready for the simulator."""

    config: ScenarioConfig
    initial_task: TaskParams
    events: tuple[FaultEvent, ...]


def resolve_scenario(config: ScenarioConfig, joint_names: Sequence[str],
                     source: str = "scenario") -> Scenario:
    """Turn the cumulative changes into full :class:`TaskParams` per event."""
    nominal = TaskParams().normalized(len(joint_names))
    try:
        initial = config.initial.apply(nominal, joint_names)
    except ValueError as exc:
        raise ConfigError(f"{source}: initial: {exc}") from None
    current = initial
    events = []
    for i, event in enumerate(config.events):
        try:
            current = event.change.apply(nominal if event.base == "nominal" else current,
                                         joint_names)
        except ValueError as exc:
            raise ConfigError(f"{source}: events.{i}.change: {exc}") from None
        events.append(FaultEvent(event.time_s, current, event.label or f"event {i}"))
    return Scenario(config, initial, tuple(events))


def load_scenario(path: str | Path, joint_names: Sequence[str]) -> Scenario:
    """Load, validate and resolve a scenario YAML for a robot with ``joint_names``."""
    config = load_yaml_model(ScenarioConfig, path)
    return resolve_scenario(config, joint_names, str(path))


class TaskCommand(TaskChange):
    """The JSON accepted on ``/sim/set_task``: a :class:`TaskChange` plus a label and base."""

    label: str = "runtime"
    base: Literal["current", "nominal"] = "current"


def parse_task_command(text: str, current: TaskParams,
                       joint_names: Sequence[str]) -> tuple[TaskParams, str]:
    """Parse a ``/sim/set_task`` JSON message; return ``(new task, label)``.

    Raises :class:`ConfigError` with a readable message on bad JSON or bad values.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"/sim/set_task: not JSON: {exc}") from None
    command = validate_model(TaskCommand, data, "/sim/set_task")
    base = TaskParams() if command.base == "nominal" else current
    try:
        return command.apply(base, joint_names), command.label
    except ValueError as exc:
        raise ConfigError(f"/sim/set_task: {exc}") from None


def task_to_json(task: TaskParams, time_s: float, label: str) -> str:
    """The ``/sim/true_task`` debug message: ``{"time_s", "label", "task": {...}}``."""
    return json.dumps({"time_s": round(time_s, 9), "label": label, "task": task.to_dict()})
