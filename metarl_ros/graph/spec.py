"""Node graphs described once, as data, for ``ros2 launch`` and ``metarl launch`` alike.

A graph is built from launch-argument values (strings, as on a command line:
``policy:=pearl``) and lists the nodes to start: package, executable, node name, parameter
files (package-relative), typed parameter overrides and remappings. Two front ends consume it:

* ``launch/<graph>.launch.py`` (``ros2 launch metarl_ros adapt_sim.launch.py``) turns each
  :class:`NodeSpec` into a ``launch_ros.actions.Node`` at launch time;
* ``metarl launch <graph>`` (:mod:`metarl_ros.graph.runner`) runs the same nodes in one
  process without the launch library.

Graphs: ``adapt_sim`` (simulator + controller, :func:`adapt_sim_graph`) and ``deploy`` (the
ONNX controller alone, for hardware, :func:`deploy_graph`).

So the two cannot drift apart: change the graph here, both follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from metarl_ros.control.joint_map import COMMAND_TYPES, command_topic
from metarl_ros.control.safety import SAFE_MODES
from metarl_ros.core.resources import PACKAGE_NAME, resolve_path
from metarl_ros.policy.factory import DEPLOY_KINDS, POLICY_KINDS
from metarl_ros.policy.onnx_policy import POSTERIOR_UPDATES

_BOOLS = ("true", "false")


@dataclass(frozen=True)
class LaunchArgument:
    """One launch argument: its default (a string) and the type its value converts to."""

    name: str
    default: str
    description: str
    kind: type = str
    choices: tuple[str, ...] = ()

    def convert(self, text: str) -> Any:
        """The typed value of ``text``; raises ``ValueError`` naming the argument."""
        value = text.strip()
        if self.kind is bool:
            if value.lower() not in _BOOLS:
                raise ValueError(f"{self.name}:={text!r}: expected true or false")
            return value.lower() == "true"
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name}:={text!r}: expected one of {', '.join(self.choices)}")
        if self.kind is float:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{self.name}:={text!r}: expected a number") from None
        return value

    @property
    def launch_choices(self) -> list[str] | None:
        """Choices for ``DeclareLaunchArgument`` (bools included), or None."""
        if self.kind is bool:
            return list(_BOOLS)
        return list(self.choices) or None


@dataclass(frozen=True)
class NodeSpec:
    """A node to start. ``parameters`` override the files and keep their Python types."""

    name: str
    executable: str
    module: str
    """module holding the node class, for in-process composition."""
    node_class: str
    package: str = PACKAGE_NAME
    parameter_files: tuple[str, ...] = ()
    """package-relative YAML files (``config/<node>.yaml``), applied in order."""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()
    required: bool = True
    """the graph cannot do its job without it: if it exits (or, in ``metarl launch``,
    fails) while the graph runs, the whole graph ends with a non-zero status. A simulator
    without controller, a controller without its simulator, and a ``record:=true`` run that
    records nothing are all failures, so every node of the shipped graphs is required."""


@dataclass(frozen=True)
class Graph:
    name: str
    arguments: Mapping[str, Any]
    """typed values of all launch arguments."""
    nodes: tuple[NodeSpec, ...]
    notes: tuple[str, ...] = ()
    """messages the front end logs at start (e.g. an argument accepted but ignored)."""

    def node(self, name: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.name == name:
                return spec
        raise KeyError(name)


ADAPT_SIM_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument("env_config", "sim/envs/iiwa7_compliant.yaml",
                   "Env YAML: robot, rates, observation, reward, PD feedback."),
    LaunchArgument("policy", "pd",
                   "Controller: pd or pearl in adapter_node; onnx runs onnx_policy_node (the "
                   "deployed, torch-free node) on an exported model.", choices=POLICY_KINDS),
    LaunchArgument("model", "models/pearl/model.pt",
                   "Trained model: model.pt for policy:=pearl; a `metarl export` directory for "
                   "policy:=onnx (left at its default it becomes models/pearl/onnx)."),
    LaunchArgument("adaptation", "true",
                   "Online adaptation on: the context posterior (and MAML, see maml); false = "
                   "the latent stays at the prior (the un-adapted policy).", kind=bool),
    LaunchArgument("maml", "true",
                   "policy:=pearl with adaptation: add the MAML dynamics correction (stepped "
                   "inline every adapt_every transitions in lockstep, real_time_factor:=0; in a "
                   "background thread at 10 Hz of wall time otherwise).", kind=bool),
    LaunchArgument("parameter_adaptation", "false",
                   "With adaptation: refine the feed-forward online on the model features "
                   "(policy.parameter_adaptation) on top of pd, pearl or onnx; policy:=pd "
                   "parameter_adaptation:=true is the classical adaptive feed-forward.",
                   kind=bool),
    LaunchArgument("scenario", "config/scenarios/default.yaml",
                   "Fault scenario YAML for sim_node ('' = none)."),
    LaunchArgument("command_type", "effort",
                   "effort: efforts held for a control period; impedance: setpoints + feed-"
                   "forward torque, with sim_node closing the joint impedance loop at every "
                   "physics step (as a joint_trajectory_controller with the env's PD gains).",
                   choices=("effort", "impedance")),
    LaunchArgument("gui", "false", "Show the PyBullet GUI.", kind=bool),
    LaunchArgument("record", "false",
                   "Record state, commands, reference, latent, diagnostics and true task "
                   "events to a rosbag2 bag (recorder_node).", kind=bool),
    LaunchArgument("bag", "",
                   "Bag directory for record:=true (must not exist; '' = "
                   "rosbag2_<date-time> in the working directory)."),
    LaunchArgument("use_sim_time", "true", "Nodes follow /clock from sim_node.", kind=bool),
    LaunchArgument("real_time_factor", "1.0",
                   "sim_node pacing: simulated s per wall s; 0 = lockstep, as fast as possible.",
                   kind=float),
    LaunchArgument("controller", "effort_controller",
                   "Effort commands travel on /<controller>/commands."),
    LaunchArgument("reference_preview", "0.0",
                   "sim_node sends each instant's reference this many seconds ahead of it "
                   "(0 = with its joint state).", kind=float),
    LaunchArgument("act_ahead", "file",
                   "The controller acts when a tick's reference arrives (true) or at the joint "
                   "state (false); file = its parameter file's (adapter_node false, "
                   "onnx_policy_node true).", choices=("file", "true", "false")),
)


def resolve_arguments(declared: tuple[LaunchArgument, ...],
                      values: Mapping[str, str] | None) -> dict[str, Any]:
    """Typed values for ``declared`` from ``values`` (strings); unknown names are errors."""
    values = dict(values or {})
    known = {arg.name for arg in declared}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown launch argument(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return {arg.name: arg.convert(values.get(arg.name, arg.default)) for arg in declared}


def adapt_sim_graph(values: Mapping[str, str] | None = None) -> Graph:
    """The simulated adaptation setup: ``sim_node`` + ``adapter_node`` (+ ``recorder_node``
    with ``record:=true``)."""
    args = resolve_arguments(ADAPT_SIM_ARGUMENTS, values)
    sim = NodeSpec(
        name="sim_node", executable="sim_node", module="metarl_ros.nodes.sim_node",
        node_class="SimNode", parameter_files=("config/sim_node.yaml",),
        parameters={
            "env_config": args["env_config"],
            "scenario": args["scenario"],
            "real_time_factor": args["real_time_factor"],
            "gui": args["gui"],
            "controller_name": args["controller"],
            "command_interface": args["command_type"],
            "use_sim_time": args["use_sim_time"],
            "reference_preview": args["reference_preview"],
        },
    )
    ahead = {} if args["act_ahead"] == "file" else {"act_ahead": args["act_ahead"] == "true"}
    if args["policy"] == "onnx":
        model = args["model"]
        if model == _argument(ADAPT_SIM_ARGUMENTS, "model").default:
            model = DEFAULT_ONNX_MODEL
        adapter = onnx_policy_spec({
            "env_config": args["env_config"],
            "model_path": model,
            "adaptation": args["adaptation"],
            "parameter_adaptation": args["parameter_adaptation"],
            "controller_name": args["controller"],
            "command_type": args["command_type"],
            "use_sim_time": args["use_sim_time"],
            **ahead,
        })
    else:
        adapter = NodeSpec(
            name="adapter_node", executable="adapter_node",
            module="metarl_ros.nodes.adapter_node",
            node_class="AdapterNode", parameter_files=("config/adapter_node.yaml",),
            parameters={
                "env_config": args["env_config"],
                "policy": args["policy"],
                "model_path": args["model"] if args["policy"] == "pearl" else "",
                "adaptation": args["adaptation"],
                "parameter_adaptation": args["parameter_adaptation"],
                "maml": args["maml"],
                # lockstep: simulated time does not follow the wall clock, MAML must not either
                "adaptation_schedule": ("inline" if args["real_time_factor"] == 0.0
                                        else "background"),
                "controller_name": args["controller"],
                "command_type": args["command_type"],
                "use_sim_time": args["use_sim_time"],
                **ahead,
            },
        )
    nodes: tuple[NodeSpec, ...] = (sim, adapter)
    notes = []
    if args["policy"] == "onnx" and args["adaptation"] and args["maml"]:
        notes.append("policy:=onnx adapts through the streaming posterior only: MAML needs "
                     "gradients and stays in the torch node (policy:=pearl)")
    if args["record"]:
        # first, so that it is subscribed before the simulation starts stepping
        nodes = (recorder_spec(args["controller"], args["bag"], adapter.name,
                               args["command_type"]), *nodes)
        if args["command_type"] != "effort":
            notes.append("record:=true with command_type:=impedance: the bag holds "
                         "JointTrajectory commands; `metarl retrain` reads effort commands")
        notes.append(f"record:=true: recorder_node writes {args['bag'] or 'rosbag2_<date-time>'}")
    return Graph("adapt_sim", args, nodes, tuple(notes))


def recorder_spec(controller: str, bag: str, controller_node: str = "adapter_node",
                  command_type: str = "effort") -> NodeSpec:
    """recorder_node on the topics of sim_node + the controller node (adapter_node or
    onnx_policy_node; types given: no discovery wait)."""
    command_msg = ("std_msgs/msg/Float64MultiArray" if command_type == "effort"
                   else "trajectory_msgs/msg/JointTrajectory")
    topics = {
        "/joint_states": "sensor_msgs/msg/JointState",
        command_topic(controller, command_type): command_msg,
        "/reference": "sensor_msgs/msg/JointState",
        f"/{controller_node}/latent": "std_msgs/msg/Float64MultiArray",
        "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
        "/sim/true_task": "std_msgs/msg/String",
    }
    return recorder_node_spec(topics, bag)


def recorder_node_spec(topics: Mapping[str, str], bag: str) -> NodeSpec:
    """recorder_node writing ``topics`` (absolute name -> ``pkg/msg/Type``) to ``bag``."""
    return NodeSpec(
        name="recorder_node", executable="recorder_node",
        module="metarl_ros.nodes.recorder_node", node_class="RecorderNode",
        parameter_files=("config/recorder_node.yaml",),
        parameters={"output": bag, "topics": list(topics), "types": list(topics.values())},
    )


DEFAULT_ONNX_MODEL = "models/pearl/onnx"


def _argument(declared: tuple[LaunchArgument, ...], name: str) -> LaunchArgument:
    return next(arg for arg in declared if arg.name == name)


def onnx_policy_spec(parameters: Mapping[str, Any], parameter_files: tuple[str, ...] = (),
                     remappings: tuple[tuple[str, str], ...] = ()) -> NodeSpec:
    """onnx_policy_node with its shipped parameter file, then ``parameter_files``."""
    return NodeSpec(
        name="onnx_policy_node", executable="onnx_policy_node",
        module="metarl_ros.nodes.onnx_policy_node", node_class="OnnxPolicyNode",
        parameter_files=("config/onnx_policy_node.yaml", *parameter_files),
        parameters=dict(parameters), remappings=remappings,
    )


DEPLOY_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument("policy", "onnx",
                   "onnx: the exported model; dob / adaptive_ct: the classical momentum "
                   "observer / Slotine-Li controller (no model); pd: the PD feedback alone. "
                   "None of them needs torch.", choices=DEPLOY_KINDS),
    LaunchArgument("model", DEFAULT_ONNX_MODEL, "`metarl export` directory of the model."),
    LaunchArgument("env_config", "sim/envs/iiwa7_compliant.yaml",
                   "Env YAML the model was trained with: robot, observation, PD feedback."),
    LaunchArgument("params_file", "",
                   "Extra parameter file for the robot (joint_map, controller_joints, "
                   "joint_names, hold gains, sensor_qos...; key onnx_policy_node or /**); "
                   "launch arguments override it."),
    LaunchArgument("command_type", "effort",
                   "effort: Float64MultiArray for a forward_command_controller; trajectory: "
                   "one-point JointTrajectory (effort feed-forward) for a "
                   "joint_trajectory_controller.", choices=COMMAND_TYPES),
    LaunchArgument("controller", "effort_controller",
                   "Controller name: commands on /<controller>/commands or "
                   "/<controller>/joint_trajectory."),
    LaunchArgument("command_topic", "", "Remap the command topic to this ('' = as above)."),
    LaunchArgument("joint_states", "/joint_states", "Joint state topic of the robot."),
    LaunchArgument("reference", "/reference", "Reference topic (q, qd, qdd to track)."),
    LaunchArgument("control_rate_hz", "0.0",
                   "Control rate (0 = the env's); must equal the model's.", kind=float),
    LaunchArgument("watchdog_timeout", "0.1",
                   "Seconds without fresh joint states or reference before the safe action.",
                   kind=float),
    LaunchArgument("safe_mode", "zero", "Safe action: zero effort, or hold the position.",
                   choices=SAFE_MODES),
    LaunchArgument("effort_limit_scale", "1.0",
                   "Clamp efforts to this fraction (0.01..1) of the effort limits.", kind=float),
    LaunchArgument("posterior_update", "tick",
                   "tick: the posterior takes each transition before the next action; "
                   "context: it is updated at the context rate (10 Hz) and the policy acts on "
                   "the last update (cheaper control ticks).", choices=POSTERIOR_UPDATES),
    LaunchArgument("parameter_adaptation", "false",
                   "Refine the feed-forward online on the model features "
                   "(policy.parameter_adaptation) on top of onnx or pd.", kind=bool),
    LaunchArgument("use_sim_time", "false", "Follow /clock (simulation only).", kind=bool),
    LaunchArgument("record", "false",
                   "Record the robot's joint states, the commands, the reference, the latent "
                   "and diagnostics to a rosbag2 bag (recorder_node), for `metarl retrain`.",
                   kind=bool),
    LaunchArgument("bag", "",
                   "Bag directory for record:=true (must not exist; '' = "
                   "rosbag2_<date-time> in the working directory)."),
)

_COMMAND_MSG_TYPES = {"effort": "std_msgs/msg/Float64MultiArray",
                      "trajectory": "trajectory_msgs/msg/JointTrajectory"}


def deploy_recorded_topics(args: Mapping[str, Any]) -> dict[str, str]:
    """What ``record:=true`` records on the robot (topic -> type), under the topic names the
    robot actually uses (remappings applied; relative names taken at the root namespace).
    Raises ``ValueError`` if two roles (joint states, command, reference) share a topic."""
    def absolute(name: str) -> str:
        return name if name.startswith("/") else f"/{name}"

    command = args["command_topic"] or command_topic(args["controller"], args["command_type"])
    roles = [
        ("joint_states", absolute(args["joint_states"]), "sensor_msgs/msg/JointState"),
        ("command", absolute(command), _COMMAND_MSG_TYPES[args["command_type"]]),
        ("reference", absolute(args["reference"]), "sensor_msgs/msg/JointState"),
        ("latent", "/onnx_policy_node/latent", "std_msgs/msg/Float64MultiArray"),
        ("diagnostics", "/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
    ]
    topics: dict[str, str] = {}
    owner: dict[str, str] = {}
    for role, topic, msgtype in roles:
        if topic in topics:
            raise ValueError(f"record:=true: {role} and {owner[topic]} are both on {topic}; "
                             "the recorded roles need distinct topics")
        topics[topic], owner[topic] = msgtype, role
    return topics


def deploy_graph(values: Mapping[str, str] | None = None) -> Graph:
    """The robot side: ``onnx_policy_node`` (no simulator) on the robot's topics, with
    ``recorder_node`` first when ``record:=true``."""
    args = resolve_arguments(DEPLOY_ARGUMENTS, values)
    if not 0.01 <= args["effort_limit_scale"] <= 1.0:
        raise ValueError(f"effort_limit_scale:={args['effort_limit_scale']}: expected 0.01..1")
    if args["watchdog_timeout"] <= 0.0 or args["control_rate_hz"] < 0.0:
        raise ValueError("watchdog_timeout must be > 0 and control_rate_hz >= 0")
    remappings = []
    for default, target in (("/joint_states", args["joint_states"]),
                            ("/reference", args["reference"]),
                            (command_topic(args["controller"], args["command_type"]),
                             args["command_topic"])):
        if target and target != default:
            remappings.append((default, target))
    node = onnx_policy_spec(
        {
            "policy": args["policy"],
            "env_config": args["env_config"],
            "model_path": args["model"] if args["policy"] == "onnx" else "",
            "command_type": args["command_type"],
            "controller_name": args["controller"],
            "control_rate_hz": args["control_rate_hz"],
            "watchdog_timeout": args["watchdog_timeout"],
            "safe_mode": args["safe_mode"],
            "effort_limit_scale": args["effort_limit_scale"],
            "posterior_update": args["posterior_update"],
            "parameter_adaptation": args["parameter_adaptation"],
            "use_sim_time": args["use_sim_time"],
        },
        parameter_files=(args["params_file"],) if args["params_file"] else (),
        remappings=tuple(remappings),
    )
    if not args["record"]:
        return Graph("deploy", args, (node,))
    topics = deploy_recorded_topics(args)
    notes = [f"record:=true: recorder_node writes {', '.join(topics)} to "
             f"{args['bag'] or 'rosbag2_<date-time>'}"]
    if args["command_type"] == "trajectory":
        notes.append("record:=true with command_type:=trajectory: the bag holds JointTrajectory "
                     "commands; `metarl retrain` reads effort (Float64MultiArray) commands")
    # first, so that it is subscribed before the controller's first command
    return Graph("deploy", args, (recorder_node_spec(topics, args["bag"]), node), tuple(notes))


GRAPHS = {"adapt_sim": (ADAPT_SIM_ARGUMENTS, adapt_sim_graph),
          "deploy": (DEPLOY_ARGUMENTS, deploy_graph)}


def parameter_file_path(relative: str) -> str:
    """Absolute path of a package-relative parameter file (source tree or install)."""
    path = resolve_path(relative)
    if not Path(path).is_file():
        raise FileNotFoundError(f"parameter file {relative} not found (looked at {path})")
    return str(path)
