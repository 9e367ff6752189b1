"""Simulated adaptation: sim_node (PyBullet arm + fault scenario) and adapter_node.

    ros2 launch metarl_ros adapt_sim.launch.py policy:=pearl model:=models/pearl/model.pt

The nodes, their parameter files and overrides come from :mod:`metarl_ros.graph.spec`, the same
description ``metarl launch adapt_sim`` runs without the launch library. Launch arguments:
``ros2 launch metarl_ros adapt_sim.launch.py --show-args``.
"""

from metarl_ros.graph.spec import ADAPT_SIM_ARGUMENTS, adapt_sim_graph
from metarl_ros.graph.launch_description import graph_launch_description


def generate_launch_description():
    return graph_launch_description(ADAPT_SIM_ARGUMENTS, adapt_sim_graph)
