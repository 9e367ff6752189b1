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

from metarl_ros.graph.spec import DEPLOY_ARGUMENTS, deploy_graph
from metarl_ros.graph.launch_description import graph_launch_description


def generate_launch_description():
    return graph_launch_description(DEPLOY_ARGUMENTS, deploy_graph)
