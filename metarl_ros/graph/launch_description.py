"""Turn a graph description (:mod:`metarl_ros.graph.spec`) into a ROS 2 ``LaunchDescription``.

The launch files in ``launch/`` are one call to :func:`graph_launch_description`, so that
``ros2 launch`` and ``metarl launch`` (which runs the same description without the launch
library) start the same nodes with the same parameters and remappings.

Every node is *required* (:attr:`~metarl_ros.graph.spec.NodeSpec.required`): when one exits
while the launch runs -- a bad model path, a bad ``env_config``, a recorder that cannot open its
bag -- its ``on_exit`` handler raises, which makes ``ros2 launch`` log the reason, shut the
other nodes down and exit 1 (launch returns non-zero when an event handler raises). Exits
during the launch's own shutdown (Ctrl-C) are expected and ignored.

The ``launch`` and ``launch_ros`` modules are imported when a description is built, not when
this module is imported: they exist only on a ROS 2 install, and the tests substitute
stand-ins of their API on machines without one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from metarl_ros.graph.spec import Graph, LaunchArgument, parameter_file_path

GraphBuilder = Callable[[Mapping[str, str]], Graph]


def graph_launch_description(arguments: tuple[LaunchArgument, ...], build_graph: GraphBuilder):
    """A ``LaunchDescription`` declaring ``arguments`` whose nodes come from ``build_graph``.

    The graph is resolved in an ``OpaqueFunction`` once the launch arguments have values, so
    argument validation (ranges, choices, clashing topics) is the graph's own.
    """
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription

    declared = [
        DeclareLaunchArgument(arg.name, default_value=arg.default,
                              description=arg.description, choices=arg.launch_choices)
        for arg in arguments
    ]

    def nodes(context, *args, **kwargs):
        return _graph_actions(arguments, build_graph, context)

    return LaunchDescription([*declared, OpaqueFunction(function=nodes)])


def _graph_actions(arguments: tuple[LaunchArgument, ...], build_graph: GraphBuilder, context):
    from launch.actions import LogInfo
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    values = {arg.name: LaunchConfiguration(arg.name).perform(context) for arg in arguments}
    graph = build_graph(values)
    actions = [LogInfo(msg=note) for note in graph.notes]
    for spec in graph.nodes:
        files = [parameter_file_path(path) for path in spec.parameter_files]
        overrides = {key: _typed_value(value) for key, value in spec.parameters.items()}
        extra = {"on_exit": RequiredNodeExit(spec.name)} if spec.required else {}
        actions.append(Node(
            package=spec.package,
            executable=spec.executable,
            name=spec.name,
            parameters=[*files, overrides],
            remappings=list(spec.remappings),
            output="screen",
            **extra,
        ))
    return actions


class RequiredNodeError(RuntimeError):
    """A required node exited while the launch was running."""


class RequiredNodeExit:
    """``on_exit`` handler of a required node (``launch``'s ``OnProcessExit`` calls it with
    the ``ProcessExited`` event and the launch context).

    Raising from the handler is how a launch file gets ``ros2 launch`` to end with a
    non-zero status: ``LaunchService`` turns an exception in event handling into an error
    line, a shutdown of every other process and return code 1 (a ``Shutdown`` action would
    end it with 0).
    """

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name

    def __call__(self, event, context):
        if getattr(context, "is_shutdown", False):
            return None  # stopping anyway (Ctrl-C, another node's exit): expected
        code = getattr(event, "returncode", None)
        raise RequiredNodeError(f"required node {self.node_name} exited with code {code} "
                                "while the launch was running; ending the launch (its log "
                                "above says why)")


def _typed_value(value: Any) -> Any:
    """Strings go through YAML in launch_ros ('true' would become a bool, '' nothing): pin
    their type. bool/int/float/lists pass through unchanged."""
    from launch_ros.parameter_descriptions import ParameterValue

    if isinstance(value, str):
        return ParameterValue(value, value_type=str)
    return value
