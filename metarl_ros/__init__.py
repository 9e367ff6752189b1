"""metarl_ros: meta-RL fault adaptation for robot arms.

PyTorch learning core, PyBullet simulation and thin ROS 2 nodes.
"""

__version__ = "0.1.0"

ENV_ID = "metarl_ros/ArmTracking-v0"


def _register_envs() -> None:
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="metarl_ros.sim.env:ArmTrackingEnv")


_register_envs()
