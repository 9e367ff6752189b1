"""Turn a graph description (:mod:`metarl_ros.graph.spec`) into a ROS 2 ``LaunchDescription``.

The launch files in ``launch/`` are one call to :func:`graph_launch_description`, so that
``ros2 launch`` and ``metarl launch`` (which runs the same description without the launch
library) start the same nodes with the same parameters and remappings.

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
        actions.append(Node(
            package=spec.package,
            executable=spec.executable,
            name=spec.name,
            parameters=[*files, overrides],
            remappings=list(spec.remappings),
            output="screen",
        ))
    return actions


def _typed_value(value: Any) -> Any:
    """Strings go through YAML in launch_ros ('true' would become a bool, '' nothing): pin
    their type. bool/int/float/lists pass through unchanged."""
    from launch_ros.parameter_descriptions import ParameterValue

    if isinstance(value, str):
        return ParameterValue(value, value_type=str)
    return value
