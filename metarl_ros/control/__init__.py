"""The ROS-free control loop: control law, joint mapping, watchdog, safety, controller."""
