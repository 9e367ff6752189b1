"""adapter_node: the adaptive controller (any
:class:`~metarl_ros.control.policy_interface.AdaptivePolicy`).

The node only translates messages; the loop itself (joint mapping by name, transitions,
watchdog, safe action, clamping, diagnostics values) is
:class:`metarl_ros.control.controller.AdaptiveController`. :class:`AdapterNode` is also the deploy
node: ``onnx_policy_node`` (:mod:`metarl_ros.nodes.onnx_policy_node`) is this class with the
policy fixed to ``onnx``, so topics, parameters, safety and diagnostics are the same code.

Joint names: joints are matched **by name**. With ``joint_map`` (``model_name:robot_name``
entries, :class:`metarl_ros.control.joint_map.JointMap`) the robot's names are renamed to the
model's on ``/joint_states`` and ``/reference``, and commands are written for the controller's
joints (``controller_joints``, robot names; unset = the model's order).

Subscribes
    ``/joint_states`` (sensor_msgs/JointState; RELIABLE, or BEST_EFFORT with
    ``sensor_qos: best_effort``) -- matched **by name**, any order, extra joints ignored.
    Messages with missing joints, wrong array lengths or a non-finite value on a controlled
    joint, or bytes that are no JointState, are rejected (throttled warning, counted on
    ``/diagnostics``). Taken as serialized bytes and read without building a message
    (:mod:`metarl_ros.nodes.joint_state_bytes`): on the tick's path.
    ``/reference`` (sensor_msgs/JointState) -- position = q_ref, velocity = qd_ref,
    effort = qdd_ref (see :mod:`metarl_ros.nodes.sim_node`); names optional.

Publishes
    ``/<controller_name>/commands`` (std_msgs/Float64MultiArray, RELIABLE; ``command_type:
    effort``, the default) -- efforts (N*m) in the controller's joint order:
    :func:`~metarl_ros.control.law.effort_command` (the env's PD feedback on the reference plus
    ``clip(action, -1, 1) * action_scale``, exactly as in training), clamped to
    ``effort_limit_scale`` times the effort limits; the safe action when the policy cannot be
    trusted. Published as CDR bytes made in one call (:mod:`metarl_ros.nodes.command_cdr`).
    With ``command_type: trajectory`` the same efforts go out as a one-point
    ``trajectory_msgs/JointTrajectory`` on ``/<controller_name>/joint_trajectory`` (effort
    feed-forward for joint_trajectory_controller; see :mod:`metarl_ros.nodes.commands`); with
    ``command_type: impedance`` as joint impedance setpoints (q_ref, qd_ref) plus a feed-forward
    torque on the same topic, for a joint_trajectory_controller whose PID gains are the env's
    PD, closing the feedback at its own rate (:mod:`metarl_ros.control.impedance`).
    ``~/latent`` (std_msgs/Float64MultiArray) -- posterior over the task latent at the context
    rate: ``data = mean (d values) followed by std (d values)``; ``layout.dim`` =
    ``[{label: "mean_std", size: 2, stride: 2d}, {label: "latent", size: d, stride: d}]``.
    Not published by policies without latent (``pd``).
    ``/diagnostics`` (diagnostic_msgs/DiagnosticArray) -- one status
    ``"<node name>: control loop"``: state, inference latency p50/p99/max, command latency
    (a tick's receipt to publish) p50/p99/max, late ticks,
    window fill, latent shift, adaptation events, policy errors, rejected messages, input
    ages. Level ERROR while the safe action is commanded, WARN after policy errors or with
    more than 5 % late ticks.

Loops
    *control* (sensor-triggered at ``control_rate_hz``, see :mod:`metarl_ros.control.controller`):
    ``policy.observe`` + ``policy.act`` only. *context* (``context_rate_hz``, >= 10 Hz, node
    clock, own callback group, so with ``executor_threads`` > 1 it runs beside control):
    ``policy.update_context()`` if the policy has it, then ``policy.posterior()``.
    *watchdog* (steady clock, every control period): safe action while joint states or
    reference are older than ``watchdog_timeout`` (node clock, i.e. simulated time under
    ``use_sim_time``; one not received yet counts from the first receipt of the other).
    *diagnostics* (steady clock). With one executor thread, the context update and the
    diagnostics run right after the next tick's command is published rather than when their
    timers fire (:mod:`metarl_ros.nodes.after_tick`), so they never delay a tick; while no
    ticks come they run at once.

Parameters
    ``effort_limit_scale``, ``safe_mode`` and ``log_throttle_s`` apply at once when set at run
    time (``ros2 param set``); every other parameter is read at start-up, and setting it is
    refused with that reason. ``max_stamp_offset`` bounds how far a message's stamp may be
    from the node's clock (a ``use_sim_time`` mismatch is named in the rejection).
"""

from __future__ import annotations

import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension

from metarl_ros.control.controller import AdaptiveController
from metarl_ros.control.joint_map import JointMap, RejectedInput
from metarl_ros.control.loop_types import LoopConfig, TickResult
from metarl_ros.control.policy_interface import AdaptivePolicy, PolicyStatus
from metarl_ros.control.safety import SAFE_MODES
from metarl_ros.core.log import LogThrottle
from metarl_ros.policy.factory import (
    ADAPTATION_SCHEDULES,
    POLICY_KINDS,
    feedback_gains,
    make_policy,
)
from metarl_ros.policy.onnx_policy import POSTERIOR_UPDATES
from metarl_ros.sim.env_config import load_env_setup

from .after_tick import AfterTick
from .commands import COMMAND_TYPES, CommandPublisher
from .joint_state_bytes import JointStateReader
from .common import (
    BEST_EFFORT_QOS,
    EXECUTOR_KINDS,
    STATE_QOS,
    declare,
    guard_parameters,
    now_s,
    run_node,
    stamp_to_s,
)

NODE_NAME = "adapter_node"
_LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN,
           "error": DiagnosticStatus.ERROR}


class AdapterNode(Node):
    """See the module docstring.

    Args:
        policy: use this policy instead of building one from the ``policy`` parameter
            (tests, in-process composition).
        kwargs: passed to :class:`rclpy.node.Node` (e.g. ``parameter_overrides``).
    """

    #: policy kinds the ``policy`` parameter accepts, and its default (subclasses narrow it).
    POLICY_CHOICES: tuple[str, ...] = POLICY_KINDS
    DEFAULT_POLICY = "pd"

    def __init__(self, node_name: str = NODE_NAME, policy: AdaptivePolicy | None = None,
                 **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        p = self._declare_parameters()
        self.setup = load_env_setup(p["env_config"])
        n = self.setup.act_dim
        control_rate = p["control_rate_hz"] or self.setup.config.control_rate_hz
        model_joints = list(p["joint_names"] or self.setup.robot.joint_names)
        source = f"policy {p['policy']!r}"
        if policy is None:
            policy = make_policy(
                p["policy"], self.setup, model_path=p["model_path"], adaptation=p["adaptation"],
                maml=p["maml"], parameter_adaptation=p["parameter_adaptation"],
                adaptation_schedule=p["adaptation_schedule"],
                posterior_update=p["posterior_update"],
                pd_kp=p["pd_kp"], pd_kd=p["pd_kd"], expected_joint_names=model_joints,
                expected_rate_hz=control_rate, expected_window=p["context_window"] or None)
        else:
            source = "injected policy"
        self.policy = policy
        self.joint_map = JointMap(self.setup.robot.joint_names, p["joint_map"] or ())
        command_joints, command_order = self.joint_map.command_order(p["controller_joints"] or ())
        hold_kp, hold_kd = feedback_gains(self.setup)
        config = LoopConfig(
            control_rate_hz=control_rate,
            watchdog_timeout_s=p["watchdog_timeout"],
            safe_mode=p["safe_mode"],
            hold_kp=tuple(p["hold_kp"] or hold_kp),
            hold_kd=tuple(p["hold_kd"] or hold_kd),
            reference_sync=p["reference_sync"],
            late_tick_fraction=p["late_tick_fraction"],
            adaptation_event_threshold=p["adaptation_event_threshold"],
            effort_limit_scale=p["effort_limit_scale"],
            max_stamp_offset_s=p["max_stamp_offset"],
            act_ahead=p["act_ahead"],
        )
        if len(config.hold_kp) != n or len(config.hold_kd) != n:
            raise ValueError(f"hold_kp and hold_kd need {n} entries")
        self.loop = AdaptiveController(self.setup.law, policy, config)
        self._throttle = LogThrottle(p["log_throttle_s"])
        # adaptation events can come at the context rate: one line per 10 throttle periods
        self._event_throttle = LogThrottle(10.0 * p["log_throttle_s"])
        self._was_safe = ""
        self._policy_status = ("ok", "")
        # low-priority timer work waits for the end of the next tick (one executor thread)
        self._after_tick = AfterTick(2.0 * self.loop.period_s,
                                     enabled=p["executor_threads"] == 1)
        guard_parameters(self, {
            "effort_limit_scale": self.loop.set_effort_limit_scale,
            "safe_mode": self.loop.set_safe_mode,
            "log_throttle_s": self._set_log_throttle,
        })

        control_group = MutuallyExclusiveCallbackGroup()
        context_group = MutuallyExclusiveCallbackGroup()
        diagnostics_group = MutuallyExclusiveCallbackGroup()
        sensor_qos = BEST_EFFORT_QOS if p["sensor_qos"] == "best_effort" else STATE_QOS
        self.commands = CommandPublisher(self, p["command_type"], p["controller_name"],
                                         command_joints, command_order,
                                         impedance_horizon_s=1.0 / control_rate)
        self.command_topic = self.commands.topic
        self._latent_pub = self.create_publisher(Float64MultiArray, "~/latent", STATE_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", STATE_QOS)
        # joint states first: rclpy's SingleThreadedExecutor serves the subscriptions ready at
        # one wake-up in creation order, so a joint state that arrives with a preview (the
        # reference of a later instant, sent right after it) ticks before the preview's
        # callback runs; a reference of the joint state's own instant arriving with it makes
        # the tick due in its own callback, right after. Joint states come as bytes, read
        # without building a message (joint_state_bytes).
        self._joint_states = JointStateReader(config.max_message_joints)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, sensor_qos,
                                 callback_group=control_group, raw=True)
        self.create_subscription(JointState, "/reference", self._on_reference, sensor_qos,
                                 callback_group=control_group)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(self.loop.period_s, self._on_watchdog, callback_group=control_group,
                          clock=steady)
        self.create_timer(1.0 / p["context_rate_hz"], self._on_context,
                          callback_group=context_group)
        self.create_timer(1.0 / p["diagnostics_rate_hz"], self._on_diagnostics,
                          callback_group=diagnostics_group, clock=steady)
        renamed = "" if self.joint_map.identity else ", joints renamed by joint_map"
        if p["act_ahead"] and not self.loop.act_ahead:
            self.get_logger().warning(
                f"act_ahead: {type(policy).__name__} reads the measured state, not only the "
                "reference: it acts at the joint state")
        ahead = ", acting ahead of the joint state" if self.loop.act_ahead else ""
        self.get_logger().info(
            f"{source} ({type(policy).__name__}{ahead}) on "
            f"{self.setup.robot.name}: control {control_rate:g} Hz, context "
            f"{p['context_rate_hz']:g} Hz, {p['command_type']} commands on "
            f"{self.command_topic}{renamed}, safe_mode {p['safe_mode']}")

    # ------------------------------------------------------------------ parameters

    def _declare_parameters(self) -> dict:
        d = {}
        d["env_config"] = declare(self, "env_config", "sim/envs/iiwa7_compliant.yaml",
                                  "Env YAML defining robot, observation, reward and rates.")
        d["policy"] = declare(self, "policy", self.DEFAULT_POLICY, "Controller behind the node.",
                              choices=self.POLICY_CHOICES)
        d["model_path"] = declare(self, "model_path", "",
                                  "Trained model: model.pt for 'pearl', a `metarl export` "
                                  "directory for 'onnx' (unused by 'pd').")
        d["adaptation"] = declare(self, "adaptation", True,
                                  "Online adaptation on: the streaming posterior (and MAML, "
                                  "see maml). false = the latent stays at the prior and no "
                                  "transition reaches the policy (the un-adapted controller).")
        d["maml"] = declare(self, "maml", True,
                            "pearl with adaptation: add the MAML dynamics correction (onnx: "
                            "not exported, ignored).")
        d["parameter_adaptation"] = declare(
            self, "parameter_adaptation", False,
            "With adaptation: refine the feed-forward online on the model features "
            "(policy.parameter_adaptation) on top of pd, pearl or onnx (pd + it = the classical "
            "adaptive feed-forward). Needs an env with observation.model_features.")
        d["adaptation_schedule"] = declare(
            self, "adaptation_schedule", "background",
            "pearl MAML steps: background = in a separate process every 0.1 s of wall time, "
            "PEARL itself in onnxruntime, no torch in the control callback (a robot); inline = "
            "every adapt_every transitions in the control callback, all in torch "
            "(deterministic; a simulator in lockstep).", choices=ADAPTATION_SCHEDULES)
        d["posterior_update"] = declare(
            self, "posterior_update", "tick",
            "onnx: tick = fold each transition into the posterior before the next action "
            "(step for step as the torch node); context = fold at context_rate_hz, the policy "
            "acts on the last folded latent (cheaper ticks). pearl/pd: tick only.",
            choices=POSTERIOR_UPDATES)
        d["controller_name"] = declare(self, "controller_name", "effort_controller",
                                       "Commands go to /<controller_name>/commands (effort) or "
                                       "/<controller_name>/joint_trajectory (trajectory, "
                                       "impedance).")
        d["command_type"] = declare(self, "command_type", "effort",
                                    "effort: std_msgs/Float64MultiArray for a "
                                    "forward_command_controller; trajectory: a one-point "
                                    "trajectory_msgs/JointTrajectory carrying the efforts as "
                                    "feed-forward for a joint_trajectory_controller; "
                                    "impedance: the same topic and message with setpoints "
                                    "q_ref, qd_ref and a feed-forward torque, for a "
                                    "joint_trajectory_controller whose PID gains are the env's "
                                    "PD (the robot closes the feedback at its own rate).",
                                    choices=COMMAND_TYPES)
        d["joint_map"] = declare(self, "joint_map", None,
                                 "model_name:robot_name pairs: the robot's joint names for the "
                                 "model's joints (unset = the same names).",
                                 param_type=Parameter.Type.STRING_ARRAY)
        d["controller_joints"] = declare(self, "controller_joints", None,
                                         "The controller's joints (robot names) in its order; "
                                         "commands are written in it (unset = model order).",
                                         param_type=Parameter.Type.STRING_ARRAY)
        d["joint_names"] = declare(self, "joint_names", None,
                                   "Joints the model must control, in its order (checked "
                                   "against the model's contract; unset = the env's robot).",
                                   param_type=Parameter.Type.STRING_ARRAY)
        d["context_window"] = declare(self, "context_window", 0,
                                      "Context window (transitions) the model must have "
                                      "(0 = not checked).", low=0, high=100000)
        d["effort_limit_scale"] = declare(self, "effort_limit_scale", 1.0,
                                          "Clamp efforts to this fraction of the robot's effort "
                                          "limits (first trials on hardware); applies at once "
                                          "when set at run time.", low=0.01, high=1.0)
        d["control_rate_hz"] = declare(self, "control_rate_hz", 0.0,
                                       "Policy rate (0 = the env's control rate).",
                                       low=0.0, high=2000.0)
        d["context_rate_hz"] = declare(self, "context_rate_hz", 10.0,
                                       "Context (posterior) update rate, node clock.",
                                       low=10.0, high=1000.0)
        d["watchdog_timeout"] = declare(
            self, "watchdog_timeout", 0.1,
            "Seconds (node clock) without joint states or reference before the safe action.",
            low=0.001, high=10.0)
        d["safe_mode"] = declare(self, "safe_mode", "zero",
                                 "Safe action: zero effort, or hold (PD to the last position); "
                                 "applies at once when set at run time.",
                                 choices=SAFE_MODES)
        d["max_stamp_offset"] = declare(
            self, "max_stamp_offset", 1.0,
            "Seconds a joint state's or reference's stamp may differ from this node's clock "
            "(further: rejected, e.g. a use_sim_time mismatch); 0 = not checked.",
            low=0.0, high=1e10)
        d["hold_kp"] = declare(self, "hold_kp", None, "N*m/rad per joint for safe_mode hold "
                               "(unset = the env's feedback.kp).",
                               param_type=Parameter.Type.DOUBLE_ARRAY)
        d["hold_kd"] = declare(self, "hold_kd", None, "N*m*s/rad per joint for safe_mode hold "
                               "(unset = the env's feedback.kd).",
                               param_type=Parameter.Type.DOUBLE_ARRAY)
        d["pd_kp"] = declare(self, "pd_kp", None, "Policy 'pd': extra PD gains on top of the "
                             "env's feedback (unset = none).",
                             param_type=Parameter.Type.DOUBLE_ARRAY)
        d["pd_kd"] = declare(self, "pd_kd", None, "Policy 'pd': extra PD gains on top of the "
                             "env's feedback (unset = none).",
                             param_type=Parameter.Type.DOUBLE_ARRAY)
        d["act_ahead"] = declare(
            self, "act_ahead", False,
            "Policies whose actor reads the reference view only (PEARL's feed-forward actor): "
            "compute the action when the reference of a tick arrives, on the posterior up to "
            "the previous tick (one transition older: +1 % tracking error on the validation "
            "draw, docs/BENCHMARKS.md), so a joint state is answered with the PD feedback (and "
            "the MAML correction, if on) alone and the newest transition is observed after the "
            "command. false = act at the joint state (the evaluated controller). Other "
            "policies ignore it.")
        d["reference_sync"] = declare(
            self, "reference_sync", True,
            "Wait for a reference stamped no earlier than the joint state before a tick "
            "(deterministic lockstep); false = use the latest reference.")
        d["sensor_qos"] = declare(self, "sensor_qos", "reliable",
                                  "QoS of the joint state and reference subscriptions.",
                                  choices=("reliable", "best_effort"))
        d["diagnostics_rate_hz"] = declare(self, "diagnostics_rate_hz", 2.0,
                                           "Rate of /diagnostics (wall clock).",
                                           low=0.1, high=100.0)
        d["late_tick_fraction"] = declare(
            self, "late_tick_fraction", 0.5,
            "A tick whose receipt-to-publish time exceeds this fraction of the control "
            "period is late.", low=0.01, high=10.0)
        d["adaptation_event_threshold"] = declare(
            self, "adaptation_event_threshold", 1.0,
            "Latent-mean move (RMS, in posterior std) counted as an adaptation event.",
            low=0.0, high=1000.0)
        d["log_throttle_s"] = declare(self, "log_throttle_s", 1.0,
                                      "Minimum wall seconds between repeated warnings.",
                                      low=0.0, high=3600.0)
        d["executor_threads"] = declare(
            self, "executor_threads", 1,
            "Executor threads when run as an executable (read at start-up): 1 = "
            "SingleThreadedExecutor (lowest latency); >1 runs the context update in parallel "
            "with control (policy calls stay serialized by a lock).", low=1, high=8)
        d["executor"] = declare(
            self, "executor", "single",
            "Executor when run as an executable (read at start-up): single = rclpy's "
            "Single/MultiThreadedExecutor (by executor_threads); events = rclpy's "
            "EventsExecutor (rclpy 9, Kilted and later; one thread; lower latency, "
            "docs/BENCHMARKS.md).", choices=EXECUTOR_KINDS)
        if d["executor"] == "events" and d["executor_threads"] != 1:
            raise ValueError("parameter executor=events runs one thread: executor_threads "
                             f"must be 1, not {d['executor_threads']}")
        return d

    # ------------------------------------------------------------------ helpers

    def _set_log_throttle(self, seconds: float) -> None:
        self._throttle = LogThrottle(seconds)
        self._event_throttle = LogThrottle(10.0 * seconds)

    def _model_names(self, names):
        """A message's joint names as model names; an oversized list is passed on as it is,
        for the loop to reject on its length (renaming it would cost a pass over it)."""
        if len(names) > self.loop.config.max_message_joints:
            return names
        return self.joint_map.to_model(names)

    def _warn_throttled(self, key: str, message: str) -> None:
        dropped = self._throttle.ready(key)
        if dropped is not None:
            suffix = f" ({dropped} similar suppressed)" if dropped else ""
            self.get_logger().warning(message + suffix)

    def _send(self, result: TickResult, stamp_s: float | None = None) -> None:
        stamp_ns = None if stamp_s is None else int(round(stamp_s * 1e9))
        impedance = (self.loop.impedance(result) if self.commands.command_type == "impedance"
                     else None)
        if not self.commands.publish(result.efforts, self.loop.latest_position,
                                     stamp_ns=stamp_ns, impedance=impedance):
            self._warn_throttled("no_position", "no joint state yet: a trajectory command "
                                 "needs positions, nothing published")

    def _publish(self, result: TickResult, received: float) -> None:
        self._send(result, self.loop.last_tick_stamp)  # tagged with its instant
        self.loop.record_publish_latency(time.perf_counter() - received)
        self.loop.after_command()
        self._log_tick(result)
        self._after_tick.tick_done()

    def _log_tick(self, result: TickResult) -> None:
        if result.safe:
            if result.reason == "policy_error":
                self._warn_throttled("policy_error", f"policy failed ({result.error}); "
                                     f"commanding the safe action ({self.loop.config.safe_mode})")
            elif self._was_safe != result.reason:
                detail = f" ({result.detail})" if result.detail else ""
                self.get_logger().warning(f"{result.reason}{detail}: commanding the safe action "
                                          f"({self.loop.config.safe_mode})")
        elif self._was_safe:
            self.get_logger().info(f"policy back in control (was: {self._was_safe})")
        self._was_safe = result.reason if result.safe else ""

    # ------------------------------------------------------------------ callbacks

    def _on_joint_state(self, raw: bytes) -> None:
        received = time.perf_counter()
        now = now_s(self)
        try:
            msg = self._joint_states.read(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the deserializer raises
            error = RejectedInput("unreadable", f"{type(exc).__name__}: {exc}")
            self.loop.inputs.reject("joint_state", now, error)
            self._warn_throttled("joint_state:unreadable", f"rejected joint state: {error}")
            return
        try:
            due = self.loop.on_joint_state(msg.stamp_s, now, self._model_names(msg.names),
                                           msg.position, msg.velocity)
        except RejectedInput as exc:
            self._warn_throttled(f"joint_state:{exc.reason}", f"rejected joint state: {exc}")
            return
        if due:
            self._publish(self.loop.tick(now), received)

    def _on_reference(self, msg: JointState) -> None:
        received = time.perf_counter()
        now = now_s(self)
        try:
            due = self.loop.on_reference(stamp_to_s(msg.header.stamp), now,
                                         self._model_names(msg.name), msg.position,
                                         msg.velocity, msg.effort)
        except RejectedInput as exc:
            self._warn_throttled(f"reference:{exc.reason}", f"rejected reference: {exc}")
            return
        if due:
            self._publish(self.loop.tick(now), received)

    def _on_watchdog(self) -> None:
        self._after_tick.run_if_idle()
        result = self.loop.watchdog(now_s(self))
        if result is not None:
            self._send(result)
            if self._was_safe != result.reason:
                self.get_logger().warning(
                    f"{result.reason}: {result.detail}; commanding the safe action "
                    f"({self.loop.config.safe_mode}) every control period")
            self._was_safe = result.reason

    def _on_context(self) -> None:
        self._after_tick.submit("context", self._update_context)

    def _update_context(self) -> None:
        update = self.loop.update_context(now_s(self))
        if update is None:
            return
        d = update.mean.size
        msg = Float64MultiArray(data=np.concatenate([update.mean, update.std]).tolist())
        msg.layout.dim = [MultiArrayDimension(label="mean_std", size=2, stride=2 * d),
                          MultiArrayDimension(label="latent", size=d, stride=d)]
        self._latent_pub.publish(msg)
        if update.adaptation_event:
            dropped = self._event_throttle.ready("adaptation_event")
            if dropped is not None:
                more = f" ({dropped} more since the last line)" if dropped else ""
                self.get_logger().info(
                    f"adaptation event: latent mean moved {update.moved:.2f} posterior std (RMS "
                    f"over {update.mean.size} dims) from its last reference, threshold "
                    f"{self.loop.config.adaptation_event_threshold:g}{more}")

    def _on_diagnostics(self) -> None:
        self._after_tick.submit("diagnostics", self._publish_diagnostics)

    def _publish_diagnostics(self) -> None:
        report = self.loop.diagnostics(now_s(self))
        self._log_policy_status(report.policy)
        status = DiagnosticStatus(name=f"{self.get_name()}: control loop",
                                  hardware_id=self.setup.robot.name, message=report.message)
        status.level = _LEVELS[report.level]
        status.values = [KeyValue(key=k, value=v) for k, v in report.values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def _log_policy_status(self, status: PolicyStatus | None) -> None:
        """Log when the policy's own status (e.g. its MAML adaptation process) changes."""
        if status is None or (status.level, status.message) == self._policy_status:
            return
        if status.level == "warn":
            self.get_logger().warning(status.message)
        elif self._policy_status[0] == "warn":
            self.get_logger().info(f"policy status back to normal: {status.message}")
        self._policy_status = (status.level, status.message)

    def destroy_node(self) -> None:
        loop = getattr(self, "loop", None)  # None if the constructor failed before making it
        try:
            if loop is not None:
                loop.close()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            self.get_logger().error(f"policy close failed: {type(exc).__name__}: {exc}")
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run_node(AdapterNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
