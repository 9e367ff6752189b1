"""The environment every benchmark that starts ROS nodes gives its children."""

from __future__ import annotations

import os


def loopback_ros_env() -> dict[str, str]:
    """``os.environ`` with DDS on loopback and this run's domain (ROS_DOMAIN_ID if set, else
    one from the PID: 1..101, below Linux's ephemeral port range)."""
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 101 + 1))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_LOCALHOST_ONLY"] = "1"
    return env
