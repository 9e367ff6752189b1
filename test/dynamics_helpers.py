"""A structured dynamics model with known answers, shared by the MAML and adaptation tests."""

from __future__ import annotations

import math

import torch

from metarl_ros.learning.torque_model import PDStructure, TorqueGainDynamics


def toy_torque_model(latent_dim: int = 0) -> TorqueGainDynamics:
    """2 joints, obs = 4 blocks; PD gains 0 so that u = a; drift 0, sensitivity b = 1
    (float64: ``.float()`` for float32)."""
    pd = PDStructure((0.0, 0.0), (0.0, 0.0), (1.0, 1.0), 1.0, 1.0, 1.0)
    model = TorqueGainDynamics(8, 2, latent_dim, (), pd, init_step=1.0).double()
    with torch.no_grad():
        model.drift.weight.zero_()
        model.drift.bias.zero_()
        model.sensitivity.weight.zero_()
        # softplus(x) + 1e-3 = 1
        model.sensitivity.bias.fill_(math.log(math.expm1(1.0 - 1e-3)))
    return model
