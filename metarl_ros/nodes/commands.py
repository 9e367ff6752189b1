"""Commands to ros2_control, as one of three kinds (``command_type`` parameter).

``effort`` -- ``std_msgs/Float64MultiArray`` on ``/<controller>/commands``, for a
    ``forward_command_controller`` (e.g. ``effort_controllers/JointGroupEffortController``)
    with ``interface_name: effort``. The array is matched **by position** to the controller's
    ``joints`` list, so it is written in that order (``controller_joints``).

``trajectory`` -- ``trajectory_msgs/JointTrajectory`` on ``/<controller>/joint_trajectory``,
    for a ``joint_trajectory_controller`` with an ``effort`` command interface. The policy
    computes efforts, and a trajectory has to say what they mean; here each command is a
    one-point trajectory that *carries the efforts as feed-forward*:

    * ``header.stamp`` zero (start now), ``joint_names`` = the controller's joints (robot names;
      the controller reorders points by name),
    * one point: ``positions`` = the latest measured joint positions (the controller requires
      positions in every point), ``velocities``/``accelerations`` empty, ``effort`` = the
      commanded efforts, ``time_from_start`` zero.

    joint_trajectory_controller adds a point's ``effort`` to its PID output as feed-forward
    when it has an effort command interface (ros2_controllers PR #1200; older releases such
    as Humble's reject trajectories with effort). Configure it so the PID adds nothing --
    ``gains: {<joint>: {p: 0.0, i: 0.0, d: 0.0, ff_velocity_scale: 0.0}}`` -- and the motors
    receive exactly the efforts this node computed (PD feedback on the reference + the
    policy's residual, clamped, or the safe action), as with ``effort``. Until a first joint
    state arrives there are no positions, so nothing is published.

``impedance`` -- ``trajectory_msgs/JointTrajectory`` on ``/<controller>/joint_trajectory``, for
    a ``joint_trajectory_controller`` with an ``effort`` command interface whose PID gains
    *are* the env's PD (``gains: {<joint>: {p: <kp>, d: <kd>, i: 0.0, ff_velocity_scale:
    0.0}}``): the controller closes that feedback at its own update rate (e.g. 1 kHz) and adds
    the point's ``effort`` as feed-forward. Each command is a one-point trajectory reached one
    control period ``T`` ahead: ``time_from_start`` = T, ``positions`` = q_ref + qd_ref T +
    qdd_ref T^2/2, ``velocities`` = qd_ref + qdd_ref T, ``accelerations`` = qdd_ref (the
    reference's local parabola; positions accordingly), ``effort`` = the feed-forward
    (:mod:`metarl_ros.control.impedance`: the tick's efforts minus the PD at the tick's
    reading, so the controller commands exactly this node's efforts at that instant); the
    controller interpolates the setpoint towards the point over the period (a held setpoint
    would lag the reference by half a period on average and brake the arm). A safe tick is a
    compliant hold at the measured position (zero velocity, no feed-forward).

All are published RELIABLE (ros2_control's command subscribers are RELIABLE). ``effort`` and
``impedance`` commands go out as CDR bytes (:mod:`metarl_ros.nodes.command_cdr`: no message
object is converted on the tick's path); ``trajectory`` commands as messages.

Lockstep tag: an ``effort`` command that answers a stamped joint state carries that instant in
``layout.dim[0].label`` as ``stamp_ns:<nanoseconds>`` (``size``/``stride`` = the number of
joints). ``data`` stays the efforts, so ros2_control (which ignores ``layout``) is unaffected;
sim_node in lockstep uses the tag to ignore answers to instants it has already stepped
(duplicates of re-published instants), which otherwise shift every later answer by one.
"""

from __future__ import annotations

from array import array
from typing import Sequence

import numpy as np
from rclpy.node import Node
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from metarl_ros.control.impedance import ImpedanceCommand, along_parabola
from metarl_ros.control.joint_map import COMMAND_TYPES, command_topic

from .command_cdr import Float64ArrayEncoder, OnePointTrajectoryEncoder
from .common import COMMAND_QOS

__all__ = ["COMMAND_TYPES", "CommandPublisher", "command_topic", "command_stamp_ns",
           "impedance_values"]

STAMP_LABEL = "stamp_ns:"


def command_stamp_ns(msg: Float64MultiArray) -> int | None:
    """The instant (ns) a tagged effort command answers, or None if it carries no tag."""
    dims = msg.layout.dim
    if dims and dims[0].label.startswith(STAMP_LABEL):
        try:
            return int(dims[0].label[len(STAMP_LABEL):])
        except ValueError:
            return None
    return None


def impedance_values(msg: JointTrajectory, joint_names: Sequence[str]
                     ) -> tuple[np.ndarray | None, str]:
    """An ``impedance`` command as ``[position, velocity, acceleration, feed-forward (n
    each)]`` in the order of ``joint_names`` (matched by name), with position and velocity
    taken back along the point's parabola from its ``time_from_start`` to the message's
    arrival, or ``(None, what is wrong)``. One point; ``positions`` required; empty
    ``velocities``/``accelerations``/``effort`` mean zeros."""
    if len(msg.points) != 1:
        return None, f"{len(msg.points)} points, expected 1"
    names = list(msg.joint_names)
    if sorted(names) != sorted(joint_names) or len(set(names)) != len(names):
        return None, f"joint_names {names} are not the robot's {list(joint_names)}"
    point, n = msg.points[0], len(names)
    fields = []
    for label, values in (("positions", point.positions), ("velocities", point.velocities),
                          ("accelerations", point.accelerations), ("effort", point.effort)):
        array = np.asarray(values, dtype=np.float64)
        if array.size == 0 and label != "positions":
            array = np.zeros(n)
        if array.shape != (n,):
            return None, f"{array.size} {label}, expected {n}"
        fields.append(array)
    order = [names.index(name) for name in joint_names]
    ahead = point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
    fields[0], fields[1] = along_parabola(fields[0], fields[1], fields[2], -ahead)
    return np.concatenate([f[order] for f in fields]), ""


class CommandPublisher:
    """Publish efforts given in model joint order to a controller, in its joint order.

    Args:
        node: the publishing node.
        command_type: one of :data:`COMMAND_TYPES`.
        controller: the controller's name (topic prefix).
        joint_names: the controller's joints (robot names), in its order.
        order: for each of ``joint_names``, the index of that joint in model order.
        impedance_horizon_s: ``impedance``: the point's ``time_from_start`` (s; the control
            period): the setpoint is sent where it will be then, moving at its velocity
            (module doc).
    """

    def __init__(self, node: Node, command_type: str, controller: str,
                 joint_names: Sequence[str], order: np.ndarray,
                 impedance_horizon_s: float = 0.0) -> None:
        self.topic = command_topic(controller, command_type)  # checks command_type
        self.command_type = command_type
        self.joint_names = list(joint_names)
        self._order = np.asarray(order, dtype=np.int64)
        self._identity = bool((self._order == np.arange(self._order.size)).all())
        self.impedance_horizon_s = impedance_horizon_s
        msg_type = Float64MultiArray if command_type == "effort" else JointTrajectory
        self._publisher = node.create_publisher(msg_type, self.topic, COMMAND_QOS)
        # effort and impedance commands are published as CDR bytes made in one call
        # (command_cdr); a `trajectory` command (empty velocities and accelerations, whose
        # padding serializers disagree on) is one message filled and published at every
        # command (publishing serializes it at once), its arrays as array('d'), which the
        # message's setters take without checking every element as they do for lists
        self._effort = (Float64ArrayEncoder(len(self.joint_names)) if command_type == "effort"
                        else None)
        ahead = impedance_horizon_s
        self._impedance = (OnePointTrajectoryEncoder(
            self.joint_names, (int(ahead), int(round(ahead % 1 * 1e9))))
            if command_type == "impedance" else None)
        self._point = JointTrajectoryPoint()  # trajectory: reached at once (time_from_start 0)
        self._trajectory = JointTrajectory(joint_names=self.joint_names, points=[self._point])

    def _in_order(self, values: np.ndarray) -> np.ndarray:
        """``values`` (model order) in the controller's order, float64."""
        values = np.asarray(values, dtype=np.float64)
        return values if self._identity else values[self._order]

    def _ordered(self, values: np.ndarray) -> array:
        """``values`` (model order) in the controller's order, as a message's float64 array."""
        out = array("d")
        out.frombytes(self._in_order(values).tobytes())
        return out

    def publish(self, efforts: np.ndarray, position: np.ndarray | None,
                stamp_ns: int | None = None, impedance: ImpedanceCommand | None = None) -> bool:
        """Publish ``efforts`` (N*m, model order); ``position`` (model order) is needed for
        ``trajectory``, ``impedance`` (the same efforts as setpoints and feed-forward) for
        ``impedance``; ``stamp_ns`` = the joint-state instant this command answers (effort
        commands carry it as the lockstep tag, see the module docstring). Returns False if
        nothing could be published (no position yet)."""
        if self._effort is not None:
            self._publisher.publish(self._effort.encode(
                self._in_order(efforts),
                None if stamp_ns is None else f"{STAMP_LABEL}{int(stamp_ns)}"))
            return True
        if self._impedance is not None:
            if impedance is None:
                return False
            position, velocity = along_parabola(impedance.position, impedance.velocity,
                                                impedance.acceleration,
                                                self.impedance_horizon_s)
            self._publisher.publish(self._impedance.encode(
                self._in_order(position), self._in_order(velocity),
                self._in_order(impedance.acceleration), self._in_order(impedance.feed_forward)))
            return True
        if position is None:
            return False
        point = self._point
        point.effort = self._ordered(efforts)
        point.positions = self._ordered(position)
        self._publisher.publish(self._trajectory)
        return True

    def subscription_count(self) -> int:
        return self._publisher.get_subscription_count()
