"""ROS-free PyBullet simulation: robot, tasks and faults, references, the Gymnasium env."""
