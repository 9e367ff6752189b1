"""ROS-free PyBullet simulation: robot, tasks and faults, references, the Gymnasium env, and
the pacing of a simulator stepped by an external controller (``pacing``)."""
