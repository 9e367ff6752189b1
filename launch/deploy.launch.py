"""Deploy on a robot: onnx_policy_node alone (no simulator), on the robot's topics.

    ros2 launch metarl_ros deploy.launch.py model:=/path/to/export \
        joint_states:=/joint_states command_type:=effort controller:=effort_controller \
        params_file:=my_robot.yaml effort_limit_scale:=0.3 record:=true bag:=runs/robot_001

The node, its parameter files, overrides and remappings come from
:func:`metarl_ros.graph.deploy_graph`, the description ``metarl launch deploy`` runs without
the launch library. Launch arguments: ``ros2 launch metarl_ros deploy.launch.py --show-args``.
Robot-specific lists (joint_map, controller_joints, joint_names, hold gains) go into
``params_file``; launch arguments override it. ``record:=true`` starts recorder_node first,
writing the robot's joint states, the commands, the reference, the latent and diagnostics
(under the remapped topic names) to ``bag`` for ``metarl retrain``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from metarl_ros.graph import DEPLOY_ARGUMENTS, deploy_graph, parameter_file_path


def _launch_value(value):
    # Strings go through YAML in launch_ros ('true' would become a bool, '' nothing):
    # pin their type. bool/int/float are passed through unchanged.
    if isinstance(value, str):
        return ParameterValue(value, value_type=str)
    return value


def _nodes(context, *args, **kwargs):
    values = {arg.name: LaunchConfiguration(arg.name).perform(context)
              for arg in DEPLOY_ARGUMENTS}
    graph = deploy_graph(values)
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
        for arg in DEPLOY_ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
