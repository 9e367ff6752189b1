"""Packaging for metarl_ros (ament_python; also installable with plain pip)."""

import os

from setuptools import find_packages, setup

PACKAGE_NAME = "metarl_ros"
HERE = os.path.dirname(os.path.abspath(__file__))

# Folders installed to share/<pkg>/, recursively, keeping their structure.
DATA_DIRS = ("launch", "config", "models", "sim")
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")


def tree_data_files(folder):
    """Return one ``(dest_dir, [files])`` tuple per sub-directory of ``folder``.

    ``data_files`` does not recurse, so ``sim/robots/iiwa.yaml`` has to be listed
    as ``("share/metarl_ros/sim/robots", ["sim/robots/iiwa.yaml"])``. Paths are
    relative to this file, as setuptools requires.
    """
    entries = []
    root = os.path.join(HERE, folder)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = os.path.relpath(dirpath, HERE)
        files = [
            os.path.join(rel_dir, f)
            for f in sorted(filenames)
            if not f.endswith(SKIP_SUFFIXES)
        ]
        if files:
            entries.append((os.path.join("share", PACKAGE_NAME, rel_dir), files))
    return entries


data_files = [
    ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE_NAME]),
    ("share/" + PACKAGE_NAME, ["package.xml"]),
]
for data_dir in DATA_DIRS:
    data_files += tree_data_files(data_dir)

console_scripts = [
    "metarl = metarl_ros.cli.main:main",
    # --- ROS 2 node executables (ros2 run metarl_ros <name>) go below this line ---
    "sim_node = metarl_ros.nodes.sim_node:main",
    "adapter_node = metarl_ros.nodes.adapter_node:main",
    "onnx_policy_node = metarl_ros.nodes.onnx_policy_node:main",
    "recorder_node = metarl_ros.nodes.recorder_node:main",
]

setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    description="Meta-RL fault adaptation for robot arms: PyTorch core, PyBullet sim, "
                "ROS 2 nodes.",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=data_files,
    zip_safe=False,
    # ROS wheels and torch are extras on purpose: on a ROS 2 install rclpy and the
    # messages come from the distro, and an unpinned torch pulls a CUDA build.
    install_requires=[
        "numpy",
        "pyyaml",
        "pydantic>=2",
        "gymnasium>=1.0",
        "pybullet>=3.2.5",
        "onnxruntime>=1.17",
        "rosbags>=0.10",
        "tqdm",
        "rich",
        "matplotlib",
    ],
    extras_require={
        "learn": ["torch>=2.2", "tensorboard"],
        # metarl sweep, metarl eval --backend ray / --address (metarl_ros.distributed)
        "distributed": ["ray[tune]>=2.60"],
        # Rigid-body dynamics for the physical ceiling and the classical controllers
        # (on a ROS 2 install: the distro's pinocchio, rosdep key ``pinocchio``).
        "control": ["pin>=3"],
        "ros": [
            "ros-rclpy",
            "ros-std-msgs",
            "ros-sensor-msgs",
            "ros-geometry-msgs",
            "ros-trajectory-msgs",
            "ros-diagnostic-msgs",
            "ros-rosgraph-msgs",
            "ros-rmw-fastrtps-cpp",
        ],
        "dev": [
            "pytest",
            "colcon-common-extensions",
            "ros-ament-package",
            "mcap",
            "mcap-ros2-support",
            "onnx",
            "ruff",
        ],
    },
    entry_points={"console_scripts": console_scripts},
)
