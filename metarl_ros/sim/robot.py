"""Robot description: which URDF, which joints, their limits and how actions map to torques."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from metarl_ros.core.schema import StrictModel, load_yaml_model


class RobotSpec(StrictModel):
    """A torque-controlled serial arm.

    Loaded from ``sim/robots/<name>.yaml``. All per-joint lists follow ``joint_names`` order,
    which is also the order of the policy's observation and action vectors.
    """

    name: str
    urdf: str = Field(description="URDF path, relative to pybullet_data or to the YAML file")
    joint_names: list[str] = Field(min_length=1)
    flange_link: str = Field(description="link the payload is attached to")
    effort_limits: list[PositiveFloat] = Field(description="motor torque limits, N*m")
    velocity_limits: list[PositiveFloat] = Field(description="rad/s")
    action_scale: list[PositiveFloat] = Field(
        description="N*m commanded per unit of normalized action (action in [-1, 1])"
    )
    armature: list[NonNegativeFloat] = Field(
        description="kg*m^2, reflected rotor inertia of each drive, added to the inertia of the "
        "link the joint moves (PyBullet has no armature; without it a light wrist link cannot "
        "be torque-controlled at 100 Hz)"
    )
    friction_scale: list[PositiveFloat] = Field(
        description="multiplier on a task distribution's friction and damping for each joint, "
        "so that light wrist joints get proportionally light friction (PyBullet's joint "
        "damping is explicit and goes unstable when damping * dt / inertia is large)"
    )
    default_pose: list[float] = Field(description="rad; centre of the reference trajectories")
    position_lower: list[float]
    position_upper: list[float]

    @model_validator(mode="after")
    def _check_lengths(self) -> "RobotSpec":
        n = len(self.joint_names)
        for field in (
            "effort_limits",
            "velocity_limits",
            "action_scale",
            "armature",
            "friction_scale",
            "default_pose",
            "position_lower",
            "position_upper",
        ):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"{field} has {len(getattr(self, field))} entries, joint_names has {n}"
                )
        for j, (scale, limit) in enumerate(zip(self.action_scale, self.effort_limits)):
            if scale > limit:
                raise ValueError(f"action_scale[{j}]={scale} exceeds effort_limits[{j}]={limit}")
        for j, (low, high, q0) in enumerate(
            zip(self.position_lower, self.position_upper, self.default_pose)
        ):
            if not low < q0 < high:
                raise ValueError(f"default_pose[{j}]={q0} is outside [{low}, {high}]")
        if len(set(self.joint_names)) != n:
            raise ValueError("joint_names must be unique")
        return self

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)


def load_robot_spec(path: str | Path) -> RobotSpec:
    """Load and validate a robot description YAML."""
    return load_yaml_model(RobotSpec, path)
