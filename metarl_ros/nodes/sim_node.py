"""sim_node: the PyBullet arm (:class:`~metarl_ros.sim.arm_sim.ArmSimulation`) as a ROS robot.

It behaves like a torque-controlled arm under ros2_control with a joint_state_broadcaster and
an effort ``forward_command_controller``, plus a clock and the reference to track.

Publishes
    ``/clock`` (rosgraph_msgs/Clock) -- simulation time; run the other nodes with
    ``use_sim_time: true``.
    ``/joint_states`` (sensor_msgs/JointState, RELIABLE) -- *measured* position (rad),
    velocity (rad/s) and motor effort (N*m, including the firmware's gravity compensation),
    with the task's sensor noise; all joints, in the robot's order (subscribers must still
    match by name).
    ``/reference`` (sensor_msgs/JointState, RELIABLE) -- the trajectory to track at the same
    instant, stamped like the joint state it goes with: ``position`` = q_ref (rad),
    ``velocity`` = qd_ref (rad/s), ``effort`` = qdd_ref (rad/s^2, *not* a torque). Published
    just before ``/joint_states``; with ``reference_preview`` > 0, ``reference_preview``
    seconds ahead of its instant, just after the joint state it is sent with.
    ``/sim/true_task`` (std_msgs/String, RELIABLE + TRANSIENT_LOCAL, latched) -- ground truth
    for debugging and evaluation, JSON ``{"time_s", "label", "task": {TaskParams fields}}``,
    on every change; ``time_s`` is the simulated time the change took effect (a scheduled
    fault's own time, not the end of the step that reported it).
    ``/diagnostics`` (diagnostic_msgs/DiagnosticArray) -- sim time, achieved real-time factor,
    command counts, lockstep timeouts, current task label (1 Hz, wall clock).

Subscribes
    ``/<controller_name>/commands`` (std_msgs/Float64MultiArray, RELIABLE) -- joint efforts
    (N*m) added to gravity compensation, by position in the robot's joint order. A command of
    the wrong length or with a non-finite value is rejected with a throttled warning and the
    arm gets zero effort (gravity compensation continues) until a valid one arrives. In
    lockstep, a command tagged with the instant it answers (``layout.dim[0].label`` =
    ``stamp_ns:<ns>``, as adapter_node sends them) is ignored unless it answers the instant
    being waited for and is the first answer to it (counted in ``commands_ignored``): a late
    duplicate answer to a re-published instant must not be taken as the answer to the next
    one, and exactly one command is applied per instant. Untagged commands are taken as the
    answer to the current instant.
    ``/<controller_name>/joint_trajectory`` (trajectory_msgs/JointTrajectory, RELIABLE),
    instead, with ``command_interface: impedance`` -- joint impedance commands as adapter_node's
    ``command_type: impedance`` sends them (:mod:`metarl_ros.nodes.commands`): one point,
    joints matched by name, ``positions``/``velocities`` the setpoints and ``effort`` the
    feed-forward, reached ``time_from_start`` after arrival. The node then plays the robot's fast
    loop, a joint_trajectory_controller with PID gains ``impedance_kp``/``impedance_kd``
    (default: the env's PD): ``tau = kp (p(t) - q) + kd (v(t) - qd) + effort`` recomputed at
    every physics step from the joints' true state, the setpoint ``p(t)`` moving on the point's
    parabola (``accelerations``) through ``positions`` at ``time_from_start``
    (:meth:`~metarl_ros.sim.arm_sim.ArmSimulation.step_impedance`) until the next command;
    ``header.stamp`` is not read (a command starts on arrival). Anything else is rejected as
    above (zero effort). Impedance commands carry no lockstep tag; the env steps with efforts
    held for a control period, so lockstep in impedance mode is deterministic but not the
    env's trajectory.
    ``/sim/set_task`` (std_msgs/String) -- JSON task change applied at once, format in
    :mod:`metarl_ros.sim.scenario` (e.g. ``{"label": "drop", "payload_mass": 0.0}``).

Timing (parameter ``real_time_factor``; the logic is :mod:`metarl_ros.sim.pacing`)
    ``> 0``: physics paced against the wall clock at that factor; commands are read when due
    (the latest valid one is held, like forward_command_controller; older than
    ``command_timeout`` simulated seconds -> zero effort).
    ``0``: **lockstep**, as fast as possible and deterministic: every control period the node
    publishes clock, reference and joint states, then waits for a new command (up to
    ``lockstep_timeout`` wall seconds) before stepping; a timeout steps with zero effort and
    warns. Physics advances a whole control period per command, exactly as in the Gymnasium
    env (same observations, rewards and trajectories). In real-time mode physics advances one
    physics step at a time, each with the newest command, so a command takes effect one
    physics step after it arrives, as on a real robot (the firmware's gravity term is then
    also updated every physics step: slightly different dynamics from the env's).

Set at run time (``ros2 param set``), ``real_time_factor`` (between real-time factors > 0;
switching to or from lockstep needs a restart), ``command_timeout``, ``lockstep_timeout`` and
``log_throttle_s`` apply at once; every other parameter is read at start-up and setting it is
refused with that reason.

If the simulation thread fails, the node logs one FATAL line, sets :attr:`SimNode.failure` and
shuts its context down, so the process exits non-zero (``metarl launch`` ends the graph).

With ``wait_for_controller`` (default) simulated time stays at 0 until the first command
arrives; t = 0 is re-published every 0.1 s meanwhile, so late-starting controllers find it.

Faults come from the ``scenario`` YAML (scheduled in simulation time) and ``/sim/set_task``.
"""

from __future__ import annotations

import threading

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from metarl_ros.core.log import LogThrottle
from metarl_ros.core.resources import resolve_path
from metarl_ros.core.schema import ConfigError
from metarl_ros.sim.arm_sim import ArmSimulation
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.pacing import CommandMailbox, WallClockPacer
from metarl_ros.sim.reference import MultiSineReference
from metarl_ros.sim.scenario import Scenario, load_scenario, parse_task_command, task_to_json
from metarl_ros.sim.tasks import TaskParams

from .commands import command_stamp_ns, impedance_values
from .common import (
    COMMAND_QOS,
    LATCHED_QOS,
    STATE_QOS,
    declare,
    guard_parameters,
    ns_to_stamp,
    run_node,
)

NODE_NAME = "sim_node"


class SimNode(Node):
    """See the module docstring for topics and timing.

    Extra keyword arguments go to :class:`rclpy.node.Node` (e.g. ``parameter_overrides``).
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        p = self._declare_parameters()
        self.setup = load_env_setup(p["env_config"])
        robot = self.setup.robot
        self.joint_names = list(robot.joint_names)
        self.n = robot.num_joints
        sim_rate = self.setup.config.sim_rate_hz
        control_rate = self.setup.config.control_rate_hz
        js_rate = p["joint_state_rate_hz"] or control_rate
        chunk = sim_rate / js_rate
        per_control = js_rate / control_rate
        if abs(chunk - round(chunk)) > 1e-9 or abs(per_control - round(per_control)) > 1e-9 \
                or per_control < 1:
            raise ConfigError(
                f"joint_state_rate_hz ({js_rate}) must divide sim_rate_hz ({sim_rate}) and be a "
                f"whole multiple of control_rate_hz ({control_rate})")
        self.chunk_steps = int(round(chunk))
        self.publishes_per_control = int(round(per_control))
        self.state_period_ns = int(round(1e9 / js_rate))
        self.preview_steps = int(round(p["reference_preview"] * js_rate))
        self._last_reference_ns: int | None = None
        self.pacer = WallClockPacer(float(p["real_time_factor"]))
        self.lockstep = self.real_time_factor == 0.0
        self.lockstep_timeout = float(p["lockstep_timeout"])
        self.command_timeout = float(p["command_timeout"])
        self.command_interface = p["command_interface"]
        self.duration_s = float(p["duration_s"])
        self.wait_for_controller = bool(p["wait_for_controller"])

        scenario: Scenario | None = None
        if p["scenario"]:
            scenario = load_scenario(resolve_path(p["scenario"]), self.joint_names)
        seed = p["seed"] if p["seed"] >= 0 else (scenario.config.reference_seed if scenario else 0)
        self.scenario = scenario
        self.sim = ArmSimulation(robot, sim_rate_hz=sim_rate,
                                 gravity_compensation=self.setup.config.gravity_compensation,
                                 gui=p["gui"], seed=seed, robot_file=self.setup.robot_path)
        self.reference = MultiSineReference.sample(
            self.setup.config.reference, np.asarray(robot.default_pose),
            np.asarray(robot.position_lower), np.asarray(robot.position_upper),
            np.random.default_rng(seed))
        q_ref, qd_ref, _ = self.reference.evaluate(0.0)
        initial = scenario.initial_task if scenario else TaskParams()
        self.sim.reset(q_ref, qd_ref, task=initial)
        if scenario:
            self.sim.schedule(list(scenario.events))
        self.task_label = "initial"

        controller = p["controller_name"].strip("/")
        self.impedance = self.command_interface == "impedance"
        self.command_topic = (f"/{controller}/joint_trajectory" if self.impedance
                              else f"/{controller}/commands")
        feedback = self.setup.config.feedback
        self._kp = np.asarray(p["impedance_kp"] or feedback.kp, dtype=np.float64)
        self._kd = np.asarray(p["impedance_kd"] or feedback.kd, dtype=np.float64)
        if self._kp.shape != (self.n,) or self._kd.shape != (self.n,):
            raise ConfigError(f"impedance_kp and impedance_kd need {self.n} entries each")
        self._clock_pub = self.create_publisher(ClockMsg, "/clock", STATE_QOS)
        self._joint_pub = self.create_publisher(JointState, "/joint_states", STATE_QOS)
        self._reference_pub = self.create_publisher(JointState, "/reference", STATE_QOS)
        self._task_pub = self.create_publisher(String, "/sim/true_task", LATCHED_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", STATE_QOS)
        if self.impedance:
            self.create_subscription(JointTrajectory, self.command_topic,
                                     self._on_impedance_command, COMMAND_QOS)
        else:
            self.create_subscription(Float64MultiArray, self.command_topic, self._on_command,
                                     COMMAND_QOS)
        self.create_subscription(String, "/sim/set_task", self._on_set_task, STATE_QOS)
        self._throttle = LogThrottle(float(p["log_throttle_s"]))

        # Shared with the simulation thread.
        # impedance: [position, velocity, acceleration, feed-forward (n each), arrival (s), 1];
        # all zero = no command
        width = 4 * self.n + 2 if self.impedance else self.n
        self.commands = CommandMailbox(width, self.lockstep, lambda: self.sim.time_s)
        self._tasks_lock = threading.Lock()
        self._pending_tasks: list[tuple[TaskParams, str]] = []
        self.lockstep_timeouts = 0
        self._error_sq_sum = 0.0
        self._error_count = 0
        self.started = threading.Event()
        """set when the simulation has started stepping."""
        self.finished = threading.Event()
        """set when ``duration_s`` of simulated time has elapsed."""
        self._stop = threading.Event()
        self.failure: str | None = None
        """why the simulation thread stopped, if it failed (None while all is well)."""
        guard_parameters(self, {
            "real_time_factor": self._set_real_time_factor,
            "command_timeout": lambda v: setattr(self, "command_timeout", float(v)),
            "lockstep_timeout": lambda v: setattr(self, "lockstep_timeout", float(v)),
            "log_throttle_s": lambda v: setattr(self, "_throttle", LogThrottle(float(v))),
        })

        self._publish_task(self.sim.task, "initial")
        self.create_timer(1.0, self._publish_diagnostics,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._thread = threading.Thread(target=self._run, name="sim_loop", daemon=True)
        self._thread.start()
        mode = "lockstep" if self.lockstep else f"real_time_factor={self.real_time_factor}"
        self.get_logger().info(
            f"simulating {robot.name} ({self.n} joints) at {sim_rate:g} Hz, {mode}; joint states "
            f"at {js_rate:g} Hz; commands on {self.command_topic}; scenario: "
            f"{scenario.config.name if scenario else 'none'}")

    # ------------------------------------------------------------------ parameters

    def _declare_parameters(self) -> dict:
        d = {}
        d["env_config"] = declare(self, "env_config", "sim/envs/iiwa7_compliant.yaml",
                                  "Env YAML (robot, rates, reference); relative paths resolve "
                                  "against the working directory, then the package share.")
        d["scenario"] = declare(self, "scenario", "",
                                "Scenario YAML with timed faults ('' = none).")
        d["real_time_factor"] = declare(
            self, "real_time_factor", 1.0,
            "Simulated seconds per wall second; 0 = lockstep, as fast as possible, waiting for "
            "the controller's command every control period.", low=0.0, high=100.0)
        d["controller_name"] = declare(self, "controller_name", "effort_controller",
                                       "Commands are read from /<controller_name>/commands "
                                       "(effort) or /<controller_name>/joint_trajectory "
                                       "(impedance).")
        d["command_interface"] = declare(
            self, "command_interface", "effort",
            "effort: Float64MultiArray efforts held for a control period (a "
            "forward_command_controller); impedance: one-point JointTrajectory setpoints + "
            "feed-forward, the joint impedance loop closed at every physics step with "
            "impedance_kp/kd (a joint_trajectory_controller with those PID gains).",
            choices=("effort", "impedance"))
        d["impedance_kp"] = declare(self, "impedance_kp", None,
                                    "N*m/rad per joint of the simulated fast loop (unset = the "
                                    "env's feedback.kp).",
                                    param_type=Parameter.Type.DOUBLE_ARRAY)
        d["impedance_kd"] = declare(self, "impedance_kd", None,
                                    "N*m*s/rad per joint (unset = the env's feedback.kd).",
                                    param_type=Parameter.Type.DOUBLE_ARRAY)
        d["joint_state_rate_hz"] = declare(
            self, "joint_state_rate_hz", 0.0,
            "Rate of /joint_states, /reference and /clock (0 = the env's control rate); must "
            "divide the physics rate and be a multiple of the control rate.",
            low=0.0, high=10000.0)
        d["reference_preview"] = declare(
            self, "reference_preview", 0.0,
            "Publish each instant's /reference this many seconds before the instant (rounded "
            "to whole joint-state periods), after the joint state it is sent with: a preview, "
            "as a planner can give (adapter_node prepares a tick's action from it, act_ahead). "
            "0 = with its joint state, just before it.", low=0.0, high=1.0)
        d["lockstep_timeout"] = declare(
            self, "lockstep_timeout", 0.5,
            "Lockstep: wall seconds to wait for a command before stepping with zero effort.",
            low=0.001, high=60.0)
        d["command_timeout"] = declare(
            self, "command_timeout", 0.05,
            "Real-time mode: a command older than this (simulated s) is replaced by zero "
            "effort; 0 = hold the last command forever.", low=0.0, high=60.0)
        d["duration_s"] = declare(self, "duration_s", 0.0,
                                  "Stop stepping after this much simulated time (0 = never).",
                                  low=0.0, high=1e9)
        d["seed"] = declare(self, "seed", -1,
                            "Seed of the reference and sensor noise (-1 = the scenario's "
                            "reference_seed, or 0).", low=-1, high=2**31 - 1)
        d["wait_for_controller"] = declare(
            self, "wait_for_controller", True,
            "Hold simulated time at 0 (re-publishing it) until the first command arrives.")
        d["gui"] = declare(self, "gui", False, "Open the PyBullet GUI.")
        d["log_throttle_s"] = declare(self, "log_throttle_s", 1.0,
                                      "Minimum wall seconds between repeated warnings.",
                                      low=0.0, high=3600.0)
        return d

    def _set_real_time_factor(self, value: float) -> None:
        value = float(value)
        if (value == 0.0) != self.lockstep:
            raise ValueError("switching between lockstep (0) and real time (> 0) needs a "
                             f"restart of {self.get_name()}")
        self.pacer.set_real_time_factor(value)  # the simulation thread restarts its schedule

    @property
    def real_time_factor(self) -> float:
        return self.pacer.real_time_factor

    @property
    def commands_received(self) -> int:
        return self.commands.received

    @property
    def commands_rejected(self) -> int:
        return self.commands.rejected

    @property
    def commands_ignored(self) -> int:
        """lockstep: commands tagged with an instant other than the one awaited."""
        return self.commands.ignored

    # ------------------------------------------------------------------ callbacks

    def _warn_throttled(self, key: str, message: str) -> None:
        dropped = self._throttle.ready(key)
        if dropped is not None:
            suffix = f" ({dropped} similar suppressed)" if dropped else ""
            self.get_logger().warning(message + suffix)

    def _on_command(self, msg: Float64MultiArray) -> None:
        values = np.asarray(msg.data, dtype=np.float64)
        if self.commands.put(values, command_stamp_ns(msg)) is False:
            what = (f"{values.size} values, expected {self.n}" if values.shape != (self.n,)
                    else "non-finite values")
            self._warn_throttled("bad_command", f"rejected command on {self.command_topic} "
                                 f"({what}); holding zero effort")

    def _on_impedance_command(self, msg: JointTrajectory) -> None:
        """A one-point trajectory as joint impedance setpoints and feed-forward (module doc),
        matched by joint name; anything else is rejected (zero effort)."""
        values, problem = impedance_values(msg, self.joint_names)
        if values is None:
            self.commands.put(np.zeros(0), None)  # counted as rejected: zero effort
            self._warn_throttled("bad_command", f"rejected command on {self.command_topic} "
                                 f"({problem}); holding zero effort")
            return
        values = np.concatenate([values, [self.sim.time_s, 1.0]])
        if self.commands.put(values, None) is False:
            self._warn_throttled("bad_command", f"rejected command on {self.command_topic} "
                                 "(non-finite values); holding zero effort")

    def _step(self, command: np.ndarray, substeps: int) -> list:
        """Apply a mailbox command for ``substeps`` physics steps: efforts, or (impedance)
        the joint impedance loop closed at every physics step; no command = zero effort."""
        if not self.impedance:
            return self.sim.step(command, substeps=substeps)
        n = self.n
        if command[-1] == 0.0:
            return self.sim.step(np.zeros(n), substeps=substeps)
        return self.sim.step_impedance(*command[:4 * n].reshape(4, n), self._kp, self._kd,
                                       substeps=substeps, since_s=self.sim.time_s - command[4 * n])

    def _on_set_task(self, msg: String) -> None:
        with self._tasks_lock:
            current = self._pending_tasks[-1][0] if self._pending_tasks else self.sim.task
        try:
            task, label = parse_task_command(msg.data, current, self.joint_names)
        except ConfigError as exc:
            self.get_logger().error(f"ignored /sim/set_task: {exc}")
            return
        with self._tasks_lock:
            self._pending_tasks.append((task, label))

    # ------------------------------------------------------------------ simulation loop

    def _publish_state(self) -> int:
        """Publish clock, reference and joint state; return the command sequence number
        before publishing (an answer is a command newer than that)."""
        stamp_ns = int(round(self.sim.time_s * 1e9))
        seq = self.commands.await_answer(stamp_ns)
        stamp = ns_to_stamp(stamp_ns)
        self._clock_pub.publish(ClockMsg(clock=stamp))
        if self.preview_steps:  # this instant's reference went out earlier
            q_ref = self.reference.evaluate(self.sim.time_s)[0]
        else:
            q_ref = self._publish_reference(stamp_ns, self.sim.time_s)
        true_position = self.sim.true_state().position
        self._error_sq_sum += float(np.sum((q_ref - true_position) ** 2))
        self._error_count += 1
        reading = self.sim.measure()
        state = JointState(name=self.joint_names, position=reading.position.tolist(),
                           velocity=reading.velocity.tolist(), effort=reading.effort.tolist())
        state.header.stamp = stamp
        self._joint_pub.publish(state)
        if self.preview_steps:
            self._publish_preview(stamp_ns)
        return seq

    def _publish_reference(self, stamp_ns: int, time_s: float | None = None) -> np.ndarray:
        """Publish the reference of the instant ``stamp_ns`` (at ``time_s``, default the
        stamp's), stamped with it; returns its q_ref."""
        q_ref, qd_ref, qdd_ref = self.reference.evaluate(
            stamp_ns * 1e-9 if time_s is None else time_s)
        reference = JointState(name=self.joint_names, position=q_ref.tolist(),
                               velocity=qd_ref.tolist(), effort=qdd_ref.tolist())
        reference.header.stamp = ns_to_stamp(stamp_ns)
        self._reference_pub.publish(reference)
        return q_ref

    def _publish_preview(self, stamp_ns: int) -> None:
        """The references up to ``preview_steps`` joint-state periods after ``stamp_ns`` that
        are not out yet (all of them at the start, or after time went back)."""
        period = self.state_period_ns
        horizon = stamp_ns + self.preview_steps * period
        last = self._last_reference_ns
        first = last + period if last is not None and stamp_ns <= last <= horizon else stamp_ns
        for ns in range(first, horizon + 1, period):
            self._publish_reference(ns)
        self._last_reference_ns = horizon

    def _publish_task(self, task: TaskParams, label: str, time_s: float | None = None) -> None:
        """Publish the true task; ``time_s`` = when it took effect (default: now)."""
        self.task_label = label
        time_s = self.sim.time_s if time_s is None else time_s
        self._task_pub.publish(String(data=task_to_json(task, time_s, label)))

    def _apply_pending_tasks(self) -> None:
        with self._tasks_lock:
            pending, self._pending_tasks = self._pending_tasks, []
        for task, label in pending:
            self.sim.set_task(task)
            self._publish_task(self.sim.task, label)
            self.get_logger().info(f"t={self.sim.time_s:.3f}s task changed: {label}")

    def _wait_for_command(self, seq: int) -> np.ndarray | None:
        """Lockstep: block until a command newer than ``seq`` arrives; None on timeout/stop."""
        # Before the first command, re-publish t = 0 often: a controller that starts later
        # only receives what is published after it has been discovered.
        timeout = self.lockstep_timeout
        if not self.started.is_set():
            timeout = min(0.1, timeout)
        return self.commands.wait_newer(seq, timeout, self._stop)

    def _current_command(self) -> np.ndarray:
        return self.commands.current(self.command_timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            if self._stop.is_set() or not self.context.ok():
                return  # shutting down (e.g. SIGINT shut the context before destroy_node)
            self.failure = f"simulation loop crashed: {type(exc).__name__}: {exc}"
            self.get_logger().fatal(self.failure)
            # no simulation, no graph: end the process (run_node exits 1 on a failure) or,
            # in metarl launch, the graph sharing this context
            self.context.try_shutdown()

    def _loop(self) -> None:
        publish_index = 0
        while not self._stop.is_set() and self.context.ok():
            self._apply_pending_tasks()
            if self.duration_s and self.sim.time_s >= self.duration_s - 0.5 * self.sim.dt:
                if not self.finished.is_set():
                    self.get_logger().info(f"duration {self.duration_s:g} s reached; "
                                           "simulation paused")
                    self.finished.set()
                self._stop.wait(0.05)
                continue
            seq = self._publish_state()
            at_control = publish_index % self.publishes_per_control == 0
            if not self.started.is_set() and self.wait_for_controller:
                if self._wait_for_command(seq) is None:
                    continue  # no controller yet: publish the same instant again
                self._mark_started()
                if self.lockstep:
                    events = self._step(self.commands.latest(), self.chunk_steps)
                else:
                    events = self._step_real_time()
            elif self.lockstep:
                command = self._current_command()
                if at_control:
                    command = self._wait_for_command(seq)
                    if command is None:
                        if self._stop.is_set():
                            break
                        self.lockstep_timeouts += 1
                        self._warn_throttled(
                            "lockstep_timeout",
                            f"no command within {self.lockstep_timeout:g} s (lockstep); "
                            "stepping with zero effort")
                        command = np.zeros(self.commands.n)
                self._mark_started()
                events = self._step(command, self.chunk_steps)
            else:
                self._mark_started()
                events = self._step_real_time()
            publish_index += 1
            for event in events:
                # stamped with the time it struck (not the end of the step that reported it)
                self._publish_task(event.task, event.label, event.time_s)
                self.get_logger().info(f"t={event.time_s:.3f}s scheduled fault: {event.label}")

    def _mark_started(self) -> None:
        if not self.started.is_set():
            self.pacer.start(self.sim.time_s)
            self.started.set()

    def _step_real_time(self) -> list:
        """One chunk against the wall clock (:meth:`WallClockPacer.run`)."""
        return self.pacer.run(self.sim, self.chunk_steps, self._current_command, self._stop,
                              step=self._step)

    # ------------------------------------------------------------------ diagnostics

    def tracking_rms_mrad(self) -> float:
        """RMS over the published instants of ``||q_ref - q||`` (true joint positions), mrad:
        how well whatever controls the arm tracks (0 before the first instant)."""
        if not self._error_count:
            return 0.0
        return 1e3 * float(np.sqrt(self._error_sq_sum / self._error_count))

    def achieved_real_time_factor(self) -> float:
        return self.pacer.achieved(self.sim.time_s)

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=f"{self.get_name()}: simulation",
                                  hardware_id=self.setup.robot.name)
        status.level = DiagnosticStatus.OK
        status.message = "running" if self.started.is_set() else "waiting for first command"
        if self.finished.is_set():
            status.message = "duration reached"
        values = {
            "sim_time_s": f"{self.sim.time_s:.3f}",
            "real_time_factor_target": f"{self.real_time_factor:g}",
            "real_time_factor_achieved": f"{self.achieved_real_time_factor():.2f}",
            "commands_received": self.commands_received,
            "commands_rejected": self.commands_rejected,
            "commands_ignored": self.commands_ignored,
            "tracking_rms_mrad": f"{self.tracking_rms_mrad():.3f}",
            "lockstep_timeouts": self.lockstep_timeouts,
            "overruns": self.pacer.overruns,
            "task": self.task_label,
        }
        if self.commands_rejected or self.lockstep_timeouts:
            status.level = DiagnosticStatus.WARN
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self) -> None:
        # (attributes are missing if the constructor failed: rclpy still destroys the node
        # when its context shuts down)
        if hasattr(self, "_thread"):
            self._stop.set()
            self.commands.wake()
            if self._thread.is_alive() and self._thread is not threading.current_thread():
                self._thread.join(timeout=5.0)
        if hasattr(self, "sim"):
            self.sim.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run_node(SimNode, args)  # the simulation loop has its own thread


if __name__ == "__main__":
    raise SystemExit(main())
