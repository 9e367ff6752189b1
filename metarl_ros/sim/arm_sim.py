"""The PyBullet simulation core shared by the Gymnasium env and the ROS simulator node.

Physics model of one torque-controlled arm (fixed base, no contacts):

* **Commands** are joint torques in N*m *on top of* gravity compensation of the nominal arm,
  which the simulated robot firmware adds itself (as the KUKA iiwa FRI torque mode and the
  Franka torque interface do). The firmware's model does not know about payloads. Command and
  gravity term are computed once per :meth:`ArmSimulation.step` call (the command rate) and
  held for its physics sub-steps.
* **Drives** have reflected rotor inertia (``armature``), added to each moving link's inertia.
* **Motors** deliver ``strength_j * (command_j + g_j(q))`` saturated at
  ``strength_j * effort_limit_j``: a weakened motor is both less effective and capped lower.
* **Friction** acts in the joints after the motors, inside the physics engine: Coulomb
  friction as a velocity-zero joint motor whose force is capped at the friction torque (so
  static friction holds exactly), viscous damping as PyBullet's joint damping.
* **Locked joints** are held by their brake (a stiff position constraint); commands to them
  are ignored.
* **Payload** is a point mass rigidly attached at an offset in the flange frame (a separate
  body with a fixed constraint, so its inertia and lever arm are simulated, not approximated).
* **Actuator delay** is a FIFO of commands, in physics steps. **Sensor noise** is added to the
  readings returned by :meth:`ArmSimulation.measure`, never to the physics.

The task (:class:`~metarl_ros.sim.tasks.TaskParams`) can change between any two physics steps,
either immediately (:meth:`ArmSimulation.set_task`) or at a scheduled time
(:meth:`ArmSimulation.schedule`).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import heapq
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybullet
import pybullet_data

from metarl_ros.control.impedance import along_parabola
from metarl_ros.core.schema import ConfigError
from metarl_ros.sim.robot import RobotSpec
from metarl_ros.sim.tasks import FaultEvent, TaskParams

_BRAKE_FORCE_FACTOR = 20.0  # brake torque as a multiple of the joint's effort limit
_PAYLOAD_CONSTRAINT_FORCE = 1e5
_PAYLOAD_RADIUS = 0.03  # m, for the payload's own (small) inertia


def check_display() -> None:
    """Raise :class:`ConfigError` unless an X display is reachable (Linux).

    PyBullet's GUI client calls ``exit(1)`` from C when it cannot open its window, with no
    exception to catch and no message a log collector keeps; so ask first, the way it would
    connect: ``XOpenDisplay`` on ``$DISPLAY`` through libX11 (it loads the same library).
    """
    if not sys.platform.startswith("linux"):
        return
    display = os.environ.get("DISPLAY", "")
    if not display:
        raise ConfigError("gui: the PyBullet GUI needs an X display and DISPLAY is not set; "
                          "run with gui:=false (headless), or set DISPLAY")
    library = ctypes.util.find_library("X11")
    if library is None:
        raise ConfigError(f"gui: the PyBullet GUI needs libX11, which is not installed "
                          f"(DISPLAY={display}); run with gui:=false")
    x11 = ctypes.CDLL(library)
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    handle = x11.XOpenDisplay(display.encode())
    if not handle:
        raise ConfigError(f"gui: cannot open the X display DISPLAY={display} for the PyBullet "
                          "GUI; run with gui:=false, or fix DISPLAY / the X server's access")
    x11.XCloseDisplay(handle)


@dataclass(frozen=True)
class JointReading:
    """One reading of all joints, in joint order. Each array has shape (n,)."""

    position: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray


class ArmSimulation:
    """A torque-controlled arm in its own PyBullet physics client.

    Args:
        robot: robot description.
        sim_rate_hz: physics rate.
        gravity_compensation: add the nominal arm's gravity torque to every command.
        gui: open the PyBullet GUI instead of the headless DIRECT mode.
        seed: seed of the sensor-noise generator.
    """

    def __init__(
        self,
        robot: RobotSpec,
        sim_rate_hz: float = 500.0,
        gravity_compensation: bool = True,
        gui: bool = False,
        seed: int | None = None,
        robot_file: Path | None = None,
    ) -> None:
        if sim_rate_hz <= 0:
            raise ValueError(f"sim_rate_hz must be > 0, got {sim_rate_hz}")
        self.robot = robot
        self.dt = 1.0 / sim_rate_hz
        self.gravity_compensation = gravity_compensation
        self.num_joints = robot.num_joints
        self._effort_limits = np.asarray(robot.effort_limits, dtype=np.float64)
        self._rng = np.random.default_rng(seed)
        if gui:
            check_display()  # PyBullet's GUI exits the whole process when it finds none
        self._client = pybullet.connect(pybullet.GUI if gui else pybullet.DIRECT)
        self._body, self._joint_ids, self._flange_id = self._load_robot(robot_file)
        self._free_joint_ids: list[int] = list(self._joint_ids)
        self._free_index = np.arange(self.num_joints)
        self._zeros = [0.0] * self.num_joints
        self._payload_body: int | None = None
        self._payload_constraint: int | None = None
        self._pending: list[FaultEvent] = []
        self._task = TaskParams().normalized(self.num_joints)
        self._strength = np.ones(self.num_joints)
        self._coulomb = np.zeros(self.num_joints)
        self._motor_limit = self._effort_limits.copy()
        self._locked: tuple[int, ...] = ()
        self._delay_queue: collections.deque[np.ndarray] = collections.deque()
        self._delay_steps = 0
        self._last_command = np.zeros(self.num_joints)
        self._push: tuple[np.ndarray, float, float] | None = None
        self.time_s = 0.0
        self.step_count = 0
        self._last_motor_effort = np.zeros(self.num_joints)
        self._position = np.asarray(robot.default_pose, dtype=np.float64)
        self._velocity = np.zeros(self.num_joints)
        self.reset(np.asarray(robot.default_pose))

    # ---------------------------------------------------------------- setup

    def _call(self, function, *args, **kwargs):
        return function(*args, physicsClientId=self._client, **kwargs)

    def _load_robot(self, robot_file: Path | None) -> tuple[int, list[int], int]:
        urdf = Path(self.robot.urdf)
        if not urdf.is_absolute():
            base = robot_file.parent if robot_file is not None else None
            candidates = ([base / urdf] if base else []) + [
                Path(pybullet_data.getDataPath()) / urdf
            ]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"robot {self.robot.name!r}: URDF {self.robot.urdf!r} not found in "
                    + ", ".join(str(c) for c in candidates)
                )
            urdf = found[0]
        self._call(pybullet.resetSimulation)
        self._call(pybullet.setGravity, 0.0, 0.0, -9.81)
        self._call(pybullet.setTimeStep, self.dt)
        body = self._call(pybullet.loadURDF, str(urdf), useFixedBase=True)
        by_name: dict[str, int] = {}
        links: dict[str, int] = {}
        for index in range(self._call(pybullet.getNumJoints, body)):
            info = self._call(pybullet.getJointInfo, body, index)
            by_name[info[1].decode()] = index
            links[info[12].decode()] = index
        missing = [name for name in self.robot.joint_names if name not in by_name]
        if missing:
            raise ValueError(f"robot {self.robot.name!r}: joints {missing} not in {urdf}")
        if self.robot.flange_link not in links:
            raise ValueError(
                f"robot {self.robot.name!r}: link {self.robot.flange_link!r} not in {urdf}"
            )
        joint_ids = [by_name[name] for name in self.robot.joint_names]
        for link in [-1, *range(self._call(pybullet.getNumJoints, body))]:
            self._call(
                pybullet.changeDynamics,
                body,
                link,
                linearDamping=0.0,
                angularDamping=0.0,
                jointDamping=0.0,
            )
        for jid, armature in zip(joint_ids, self.robot.armature):
            inertia = np.asarray(self._call(pybullet.getDynamicsInfo, body, jid)[2]) + armature
            self._call(pybullet.changeDynamics, body, jid, localInertiaDiagonal=inertia.tolist())
        # Disable the default velocity motors so joints are torque-driven.
        self._call(
            pybullet.setJointMotorControlArray,
            body,
            joint_ids,
            pybullet.VELOCITY_CONTROL,
            forces=[0.0] * len(joint_ids),
        )
        return body, joint_ids, links[self.robot.flange_link]

    # ---------------------------------------------------------------- task handling

    @property
    def task(self) -> TaskParams:
        """The physical parameters in force now."""
        return self._task

    def set_task(self, task: TaskParams) -> None:
        """Switch the robot's physical parameters now (between two physics steps)."""
        task.validate(self.num_joints)
        task = task.normalized(self.num_joints)
        self._strength = np.asarray(task.motor_strength, dtype=np.float64)
        self._motor_limit = self._strength * self._effort_limits
        self._coulomb = np.asarray(task.coulomb_friction, dtype=np.float64)
        for j, jid in enumerate(self._joint_ids):
            pybullet.changeDynamics(
                self._body, jid, jointDamping=task.viscous_damping[j], physicsClientId=self._client
            )
        self._locked = ()  # re-applied below, so friction motors are restored on free joints
        self._set_locks(task.locked_joints)
        self._set_payload(task.payload_mass, task.payload_offset)
        self._set_delay(task.actuator_delay_s)
        self._task = task

    def schedule(self, events: list[FaultEvent]) -> None:
        """Apply each event's task when simulation time reaches its ``time_s``."""
        for event in events:
            if event.time_s < self.time_s:
                raise ValueError(f"fault at t={event.time_s}s is in the past (now {self.time_s}s)")
            event.task.validate(self.num_joints)
            heapq.heappush(self._pending, event)

    def clear_schedule(self) -> None:
        self._pending.clear()

    def _set_locks(self, locked: tuple[int, ...]) -> None:
        """Brake the ``locked`` joints; every other joint gets its Coulomb-friction motor."""
        for j, jid in enumerate(self._joint_ids):
            if j in locked:
                pybullet.setJointMotorControl2(
                    self._body,
                    jid,
                    pybullet.POSITION_CONTROL,
                    targetPosition=float(self._position[j]),
                    targetVelocity=0.0,
                    force=_BRAKE_FORCE_FACTOR * float(self._effort_limits[j]),
                    positionGain=1.0,
                    velocityGain=1.0,
                    physicsClientId=self._client,
                )
            else:
                pybullet.setJointMotorControl2(
                    self._body,
                    jid,
                    pybullet.VELOCITY_CONTROL,
                    targetVelocity=0.0,
                    force=float(self._coulomb[j]),
                    physicsClientId=self._client,
                )
        self._locked = tuple(locked)
        self._free_joint_ids = [
            jid for j, jid in enumerate(self._joint_ids) if j not in self._locked
        ]
        self._free_index = np.array(
            [j for j in range(self.num_joints) if j not in self._locked], dtype=np.int64
        )

    def _set_payload(self, mass: float, offset: tuple[float, float, float]) -> None:
        if self._payload_constraint is not None:
            self._call(pybullet.removeConstraint, self._payload_constraint)
            self._call(pybullet.removeBody, self._payload_body)
            self._payload_constraint = self._payload_body = None
        if mass <= 0.0:
            return
        # Constraint frames are relative to the link's centre of mass: convert the flange-frame
        # offset into that frame.
        dyn = self._call(pybullet.getDynamicsInfo, self._body, self._flange_id)
        inv_pos, inv_orn = pybullet.invertTransform(dyn[3], dyn[4])
        local_pos, _ = pybullet.multiplyTransforms(inv_pos, inv_orn, offset, [0, 0, 0, 1])
        link = self._call(
            pybullet.getLinkState, self._body, self._flange_id, computeForwardKinematics=True
        )
        world_pos, _ = pybullet.multiplyTransforms(link[4], link[5], offset, [0, 0, 0, 1])
        self._payload_body = self._call(
            pybullet.createMultiBody,
            baseMass=float(mass),
            baseCollisionShapeIndex=-1,
            baseVisualShapeIndex=-1,
            basePosition=world_pos,
            baseOrientation=link[1],
        )
        self._payload_constraint = self._call(
            pybullet.createConstraint,
            self._body,
            self._flange_id,
            self._payload_body,
            -1,
            pybullet.JOINT_FIXED,
            [0, 0, 0],
            local_pos,
            [0, 0, 0],
        )
        self._call(
            pybullet.changeConstraint, self._payload_constraint, maxForce=_PAYLOAD_CONSTRAINT_FORCE
        )
        # A body without collision shape gets a default inertia far too large for a small
        # payload: give it that of a solid 3 cm sphere.
        sphere = 0.4 * float(mass) * _PAYLOAD_RADIUS**2
        self._call(
            pybullet.changeDynamics, self._payload_body, -1, localInertiaDiagonal=[sphere] * 3
        )
        vel = self._call(
            pybullet.getLinkState, self._body, self._flange_id, computeLinkVelocity=True
        )
        self._call(pybullet.resetBaseVelocity, self._payload_body, vel[6], vel[7])

    def _set_delay(self, delay_s: float) -> None:
        steps = int(round(delay_s / self.dt))
        queue = list(self._delay_queue)
        # the oldest command still in flight, or (no delay so far) the one the motors apply now
        fill = queue[0] if queue else self._last_command
        # keep the newest commands, pad with the oldest so no command is invented
        queue = queue[-steps:] if steps else []
        queue = [fill] * (steps - len(queue)) + queue
        self._delay_queue = collections.deque(queue)
        self._delay_steps = steps

    # ---------------------------------------------------------------- stepping

    def reset(
        self,
        position: np.ndarray,
        velocity: np.ndarray | None = None,
        task: TaskParams | None = None,
    ) -> None:
        """Put the arm in a state, clear scheduled faults and set the task (default: intact)."""
        position = np.asarray(position, dtype=np.float64)
        velocity = np.zeros(self.num_joints) if velocity is None else np.asarray(velocity, float)
        if position.shape != (self.num_joints,) or velocity.shape != (self.num_joints,):
            raise ValueError(f"reset needs position and velocity of shape ({self.num_joints},)")
        self._set_locks(())
        self._set_payload(0.0, (0.0, 0.0, 0.0))
        for j, jid in enumerate(self._joint_ids):
            self._call(
                pybullet.resetJointState, self._body, jid, float(position[j]), float(velocity[j])
            )
        self._position, self._velocity = position.copy(), velocity.copy()
        self._pending.clear()
        self._delay_queue.clear()
        self._push = None
        self._last_command = np.zeros(self.num_joints)
        self.time_s = 0.0
        self.step_count = 0
        self._last_motor_effort = np.zeros(self.num_joints)
        self.set_task(task if task is not None else TaskParams())

    def _read_joints(self) -> None:
        states = pybullet.getJointStates(self._body, self._joint_ids, physicsClientId=self._client)
        self._position = np.array([s[0] for s in states])
        self._velocity = np.array([s[1] for s in states])

    def _apply_due_events(self) -> list[FaultEvent]:
        applied = []
        eps = 0.5 * self.dt
        # Mid-call, the cached state is from the start of the step() call: refresh it so a
        # brake engages where the joint is now, not where it was a few sub-steps ago.
        self._read_joints()
        while self._pending and self._pending[0].time_s <= self.time_s + eps:
            event = heapq.heappop(self._pending)
            self.set_task(event.task)
            applied.append(event)
        return applied

    def step(self, effort_command: np.ndarray, substeps: int = 1) -> list[FaultEvent]:
        """Hold ``effort_command`` (N*m, shape (n,)) for ``substeps`` physics steps.

        The firmware's gravity term is computed from the state at the start of the call and
        held with the command. Returns the fault events that took effect during these steps.
        """
        command = self._checked("effort command", effort_command)
        return self._advance(lambda: command, substeps, constant=True)

    def step_impedance(self, position: np.ndarray, velocity: np.ndarray,
                       acceleration: np.ndarray, feed_forward: np.ndarray, kp: np.ndarray,
                       kd: np.ndarray, substeps: int = 1, since_s: float = 0.0
                       ) -> list[FaultEvent]:
        """Joint impedance closed at every physics step, as a torque-controlled arm's fast
        loop does: ``tau = kp (p(t) - q) + kd (v(t) - qd) + feed_forward`` on the joints' true
        state (encoders), the setpoint moving on its parabola, ``p(t) = position + velocity s +
        acceleration s^2 / 2``, ``v(t) = velocity + acceleration s`` with ``s = since_s + t``
        (``since_s``: how long ago ``position`` was the setpoint; ``t`` from the start of this
        call), for ``substeps`` steps. All (n,): rad, rad/s, rad/s^2, N*m, N*m/rad, N*m*s/rad.
        Gravity compensation as in :meth:`step`."""
        setpoint = self._checked("impedance position", position)
        rate = self._checked("impedance velocity", velocity)
        accel = self._checked("impedance acceleration", acceleration)
        ff = self._checked("impedance feed-forward", feed_forward)
        kp, kd = self._checked("kp", kp), self._checked("kd", kd)
        start = self.time_s - since_s

        def torque() -> np.ndarray:
            target, target_rate = along_parabola(setpoint, rate, accel, self.time_s - start)
            return kp * (target - self._position) + kd * (target_rate - self._velocity) + ff

        return self._advance(torque, substeps, constant=False)

    def _checked(self, what: str, values: np.ndarray) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (self.num_joints,):
            raise ValueError(f"{what} must have shape ({self.num_joints},), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{what} contains non-finite values")
        return array

    def _advance(self, command_now, substeps: int, constant: bool) -> list[FaultEvent]:
        """``substeps`` physics steps with the torque ``command_now()`` (N*m, (n,)) asks for
        at each; ``constant``: it does not change within the call (the motor forces are then
        computed once, unless a fault or the delay line changes them)."""
        client, body = self._client, self._body
        gravity = 0.0
        if self.gravity_compensation:
            gravity = np.asarray(
                pybullet.calculateInverseDynamics(
                    body, self._position.tolist(), self._zeros, self._zeros, physicsClientId=client
                )
            )
        applied: list[FaultEvent] = []
        forces: list[float] | None = None
        for _ in range(substeps):
            if self._pending and self._pending[0].time_s <= self.time_s + 0.5 * self.dt:
                applied.extend(self._apply_due_events())
                forces = None
            if not constant:
                self._read_joints()
                forces = None
            command = command_now()
            torque = command
            if self._delay_steps:
                self._delay_queue.append(command)
                torque = self._delay_queue.popleft()
                forces = None
            self._last_command = torque
            if forces is None:
                forces = self._motor_forces(torque + gravity)
            pybullet.setJointMotorControlArray(
                body,
                self._free_joint_ids,
                pybullet.TORQUE_CONTROL,
                forces=forces,
                physicsClientId=client,
            )
            if self._push is not None:
                self._apply_push()
            pybullet.stepSimulation(physicsClientId=client)
            self.step_count += 1
            self.time_s = self.step_count * self.dt
        self._read_joints()
        return applied

    def push(self, force_n: np.ndarray, start_s: float, duration_s: float) -> None:
        """Push the flange with ``force_n`` (N, world frame, shape (3,)) from ``start_s`` for
        ``duration_s`` of simulated time (a person or an obstacle; the compliance test)."""
        force = np.asarray(force_n, dtype=np.float64).reshape(3)
        if not np.isfinite(force).all() or not duration_s > 0:
            raise ValueError("push needs a finite force and a positive duration")
        self._push = (force, float(start_s), float(start_s) + float(duration_s))

    def _apply_push(self) -> None:
        assert self._push is not None
        force, start, end = self._push
        if start - 0.5 * self.dt <= self.time_s < end - 0.5 * self.dt:
            pybullet.applyExternalForce(
                self._body, self._flange_id, force.tolist(), self.flange_position().tolist(),
                pybullet.WORLD_FRAME, physicsClientId=self._client,
            )

    def _motor_forces(self, torque: np.ndarray) -> list[float]:
        """What the motors deliver for a desired torque; remembers it as the measured effort."""
        limit = self._motor_limit
        motor = np.minimum(np.maximum(self._strength * torque, -limit), limit)
        if self._locked:
            motor[list(self._locked)] = 0.0
            self._last_motor_effort = motor
            return motor[self._free_index].tolist()
        self._last_motor_effort = motor
        return motor.tolist()

    # ---------------------------------------------------------------- readings

    def true_state(self) -> JointReading:
        """Noise-free joint positions (rad), velocities (rad/s) and motor efforts (N*m)."""
        return JointReading(
            self._position.copy(), self._velocity.copy(), self._last_motor_effort.copy()
        )

    def measure(self) -> JointReading:
        """Joint readings as sensors report them (with the task's sensor noise)."""
        sigma = self._task.sensor_noise_std
        if sigma <= 0.0:
            return self.true_state()
        n = self.num_joints
        return JointReading(
            self._position + self._rng.normal(0.0, sigma, n),
            self._velocity + self._rng.normal(0.0, 10.0 * sigma, n),
            self._last_motor_effort.copy(),
        )

    def flange_position(self) -> np.ndarray:
        """World position of the flange frame, shape (3,)."""
        link = self._call(
            pybullet.getLinkState, self._body, self._flange_id, computeForwardKinematics=True
        )
        return np.asarray(link[4])

    def payload_position(self) -> np.ndarray | None:
        """World position of the payload, or ``None`` without payload."""
        if self._payload_body is None:
            return None
        return np.asarray(
            self._call(pybullet.getBasePositionAndOrientation, self._payload_body)[0]
        )

    def close(self) -> None:
        if self._client is not None and pybullet.isConnected(self._client):
            pybullet.disconnect(self._client)
        self._client = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass
