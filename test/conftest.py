"""Test-wide setup: keep DDS on loopback, on a ROS domain of this run's own.

`make test` sets these already; setting them here makes a bare `pytest` just as safe.
Values already in the environment win.
"""

import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
# 1..101: Linux-safe domain ids (higher ones put DDS ports in the ephemeral range).
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 101 + 1))
