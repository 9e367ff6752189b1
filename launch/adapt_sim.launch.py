"""Simulated adaptation: sim_node (PyBullet arm + fault scenario) and adapter_node.

    ros2 launch metarl_ros adapt_sim.launch.py policy:=pearl model:=models/pearl/model.pt

The nodes, their parameter files and overrides come from :mod:`metarl_ros.graph`, the same
description ``metarl launch adapt_sim`` runs without the launch library. Launch arguments:
``ros2 launch metarl_ros adapt_sim.launch.py --show-args``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from metarl_ros.graph import ADAPT_SIM_ARGUMENTS, adapt_sim_graph, parameter_file_path


def _launch_value(value):
    # Strings go through YAML in launch_ros ('true' would become a bool, '' nothing):
    # pin their type. bool/int/float are passed through unchanged.
    if isinstance(value, str):
        return ParameterValue(value, value_type=str)
    return value


def _nodes(context, *args, **kwargs):
    values = {arg.name: LaunchConfiguration(arg.name).perform(context)
              for arg in ADAPT_SIM_ARGUMENTS}
    graph = adapt_sim_graph(values)
    actions = [LogInfo(msg=note) for note in graph.notes]
    for spec in graph.nodes:
        files = [parameter_file_path(path) for path in spec.parameter_files]
        overrides = {key: _launch_value(value) for key, value in spec.parameters.items()}
        actions.append(Node(
            package=spec.package,
            executable=spec.executable,
            name=spec.name,
            parameters=[*files, overrides],
            remappings=list(spec.remappings),
            output='screen',
        ))
    return actions


def generate_launch_description():
    declared = [
        DeclareLaunchArgument(arg.name, default_value=arg.default,
                              description=arg.description, choices=arg.launch_choices)
        for arg in ADAPT_SIM_ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
