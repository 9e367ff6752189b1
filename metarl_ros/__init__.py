"""metarl_ros: meta-RL fault adaptation for robot arms, with ROS 2 nodes around a ROS-free core.

Subpackages, bottom to top (each imports only the ones listed before it; a test checks it):

* :mod:`~metarl_ros.core` -- foundations: errors, the validated YAML schema, package paths,
  atomic file writes, throttled logging.
* :mod:`~metarl_ros.control` -- the ROS-free control loop: control law, joint mapping,
  watchdog, safety, the controller and the policy interface it drives.
* :mod:`~metarl_ros.sim` -- the PyBullet arm, its faults and tasks, references, scenarios and
  the Gymnasium env.
* :mod:`~metarl_ros.recording` -- rosbag2 files without ROS: writing, reading, repairing.
* :mod:`~metarl_ros.learning` -- PEARL, the MAML dynamics model, training, checkpoints,
  ONNX export and retraining from bags (torch).
* :mod:`~metarl_ros.policy` -- every controller the control loop can drive: PD, the torch
  PEARL(+MAML) policy, the ONNX policy, and the factory that builds one from parameters.
* :mod:`~metarl_ros.evaluation` -- measuring methods on fault episodes: metrics and tables.
* :mod:`~metarl_ros.distributed` -- Ray: training sweeps over seeds and variants, parallel
  evaluation, on this machine or a cluster (optional extra ``[distributed]``).
* :mod:`~metarl_ros.nodes` -- the rclpy nodes; they only translate between ROS and the core.
* :mod:`~metarl_ros.graph` -- the ROS node graphs, described once, for ``ros2 launch`` and
  ``metarl launch``.
* :mod:`~metarl_ros.demo` -- ``metarl demo``: the shipped models through a fault scenario.
* :mod:`~metarl_ros.cli` -- the ``metarl`` command.

Importing the package imports nothing heavy (no torch, PyBullet or Gymnasium): the deployed
controller runs on robot computers that have none of them. The Gymnasium env
:data:`ENV_ID` is registered by importing :mod:`metarl_ros.sim.env`.
"""

__version__ = "0.1.0"

ENV_ID = "metarl_ros/ArmTracking-v0"
