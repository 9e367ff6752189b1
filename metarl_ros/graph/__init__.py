"""The ROS node graphs, described once, for ``ros2 launch`` and ``metarl launch``."""
