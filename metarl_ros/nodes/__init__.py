"""ROS 2 nodes (rclpy). Thin: they translate messages; the logic lives in ROS-free modules.

``sim_node`` -- :mod:`metarl_ros.nodes.sim_node`, the PyBullet simulator as a ros2_control-like
robot. ``adapter_node`` -- :mod:`metarl_ros.nodes.adapter_node`, the adaptive controller.
``onnx_policy_node`` -- :mod:`metarl_ros.nodes.onnx_policy_node`, the same controller on an
exported ONNX model, without torch (the deployed node).
"""
