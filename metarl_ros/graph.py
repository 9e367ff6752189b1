"""Node graphs described once, as data, for ``ros2 launch`` and ``metarl launch`` alike.

A graph is built from launch-argument values (strings, as on a command line:
``policy:=pearl``) and lists the nodes to start: package, executable, node name, parameter
files (package-relative), typed parameter overrides and remappings. Two front ends consume it:

* ``launch/adapt_sim.launch.py`` (``ros2 launch metarl_ros adapt_sim.launch.py``) turns each
  :class:`NodeSpec` into a ``launch_ros.actions.Node`` at launch time;
* ``metarl launch adapt_sim`` (:mod:`metarl_ros.cli.launch`) runs the same nodes in one
  process without the launch library.

So the two cannot drift apart: change the graph here, both follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from metarl_ros.policy_factory import POLICY_KINDS
from metarl_ros.resources import PACKAGE_NAME, resolve_path

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
    LaunchArgument("env_config", "sim/envs/iiwa7_tracking.yaml",
                   "Env YAML: robot, rates, observation, reward, PD feedback."),
    LaunchArgument("policy", "pd", "Controller of adapter_node.", choices=POLICY_KINDS),
    LaunchArgument("model", "models/pearl/model.pt", "Trained model for policy:=pearl."),
    LaunchArgument("adaptation", "true", "Online adaptation on (pearl).", kind=bool),
    LaunchArgument("scenario", "config/scenarios/default.yaml",
                   "Fault scenario YAML for sim_node ('' = none)."),
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
            "use_sim_time": args["use_sim_time"],
        },
    )
    adapter = NodeSpec(
        name="adapter_node", executable="adapter_node", module="metarl_ros.nodes.adapter_node",
        node_class="AdapterNode", parameter_files=("config/adapter_node.yaml",),
        parameters={
            "env_config": args["env_config"],
            "policy": args["policy"],
            "model_path": args["model"] if args["policy"] == "pearl" else "",
            "adaptation": args["adaptation"],
            "controller_name": args["controller"],
            "use_sim_time": args["use_sim_time"],
        },
    )
    nodes: tuple[NodeSpec, ...] = (sim, adapter)
    notes = []
    if args["record"]:
        # first, so that it is subscribed before the simulation starts stepping
        nodes = (recorder_spec(args["controller"], args["bag"]), *nodes)
        notes.append(f"record:=true: recorder_node writes {args['bag'] or 'rosbag2_<date-time>'}")
    return Graph("adapt_sim", args, nodes, tuple(notes))


def recorder_spec(controller: str, bag: str) -> NodeSpec:
    """recorder_node on the topics of sim_node + adapter_node (types given: no discovery wait)."""
    topics = {
        "/joint_states": "sensor_msgs/msg/JointState",
        f"/{controller.strip('/')}/commands": "std_msgs/msg/Float64MultiArray",
        "/reference": "sensor_msgs/msg/JointState",
        "/adapter_node/latent": "std_msgs/msg/Float64MultiArray",
        "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
        "/sim/true_task": "std_msgs/msg/String",
    }
    return NodeSpec(
        name="recorder_node", executable="recorder_node",
        module="metarl_ros.nodes.recorder_node", node_class="RecorderNode",
        parameter_files=("config/recorder_node.yaml",),
        parameters={"output": bag, "topics": list(topics), "types": list(topics.values())},
    )


GRAPHS = {"adapt_sim": (ADAPT_SIM_ARGUMENTS, adapt_sim_graph)}


def parameter_file_path(relative: str) -> str:
    """Absolute path of a package-relative parameter file (source tree or install)."""
    path = resolve_path(relative)
    if not Path(path).is_file():
        raise FileNotFoundError(f"parameter file {relative} not found (looked at {path})")
    return str(path)
