"""onnx_policy_node: the deployed controller -- an exported model in onnxruntime, no torch.

    ros2 run metarl_ros onnx_policy_node --ros-args -p model_path:=models/pearl/onnx

This is :class:`~metarl_ros.nodes.adapter_node.AdapterNode` with the policy fixed to ``onnx``
(:class:`metarl_ros.policy.onnx_policy.OnnxAdaptivePolicy`: PEARL's policy and streaming posterior,
onnxruntime with one intra-op and one inter-op thread). Topics, parameters, loops, safety and
diagnostics are adapter_node's (see its module docstring and ``docs/ROS_NODES.md``); its
parameter file is ``config/onnx_policy_node.yaml``. ``model_path`` is a ``metarl export``
directory (or its ``policy.onnx``, or a folder holding it as ``onnx/``).

Start-up is refused, with one ``[FATAL]`` line naming the file and the field and exit code 1,
when the model is missing or corrupt, or its contract (stored in the ONNX metadata) does not
match the node's configuration: ``joint_names`` (model joint order), ``control_rate_hz``,
``context_window``, or the env YAML (observation layout and scales, action scale, PD gains).

Nothing this module imports imports torch (a test checks it): robots' computers often lack it.
"""

from __future__ import annotations

from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.policy.factory import DEPLOY_KINDS

from .adapter_node import AdapterNode
from .common import run_node

NODE_NAME = "onnx_policy_node"


class OnnxPolicyNode(AdapterNode):
    """adapter_node without torch: an exported ONNX model (``policy:=onnx``), or a classical
    controller (``dob``, ``adaptive_ct``, ``pd``; :data:`~metarl_ros.policy.factory.
    DEPLOY_KINDS`)."""

    POLICY_CHOICES = DEPLOY_KINDS
    DEFAULT_POLICY = "onnx"

    def __init__(self, node_name: str = NODE_NAME, policy: AdaptivePolicy | None = None,
                 **kwargs) -> None:
        super().__init__(node_name, policy=policy, **kwargs)


def main(args: list[str] | None = None) -> int:
    return run_node(OnnxPolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
