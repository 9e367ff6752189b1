"""rosbag2 files without ROS (the rosbags library): writing, reading and repairing bags."""
