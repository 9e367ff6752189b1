"""metarl_ros: meta-RL fault adaptation for robot arms.

PyTorch learning core, PyBullet simulation and thin ROS 2 nodes.

Importing the package imports nothing heavy (no torch, PyBullet or Gymnasium): the deployed
controller runs on robot computers that have none of them. The Gymnasium env
:data:`ENV_ID` is registered by importing :mod:`metarl_ros.sim.env`.
"""

__version__ = "0.1.0"

ENV_ID = "metarl_ros/ArmTracking-v0"
