"""The dynamics models MAML adapts, built from a config or from a model file's spec.

:class:`DynamicsModel` is the plain MLP ``f(obs, action, z) -> delta``, where ``delta`` is the
first ``target_dim`` entries of ``next_obs - obs`` (e.g. the joint-velocity change),
normalised per dimension by a mean/std stored in the model (:meth:`DynamicsModel.
fit_normalizer`), all of whose weights adapt. ``z`` is the optional latent task code from the
PEARL encoder (``latent_dim`` may be 0). The shipped structured model,
:class:`~metarl_ros.learning.torque_model.TorqueGainDynamics`, declares
``adapted_parameter_names`` instead: only its per-joint torque gain and bias take inner steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metarl_ros.learning.dynamics_config import DynamicsConfig, MAMLConfig
from metarl_ros.learning.torque_model import PDStructure, TorqueGainDynamics
from metarl_ros.learning.transitions import TransitionBatch

CHECKPOINT_FORMAT = "metarl_ros.maml/1"


class DynamicsModel(nn.Module):
    """MLP ``f(obs, action, z) -> normalised next-observation delta``.

    The network input is ``concat(obs, action, z)`` of width ``obs_dim + act_dim +
    latent_dim``; the output is the normalised delta ``((next_obs - obs)[:, :target_dim] -
    delta_mean) / delta_std`` of width ``target_dim``. ``delta_mean`` / ``delta_std`` are
    buffers (in the ``state_dict``, not parameters) set by :meth:`fit_normalizer`; call it
    before meta-training, because changing it afterwards changes what the weights mean.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        target_dim: int,
        latent_dim: int = 0,
        hidden_sizes: Sequence[int] = MAMLConfig().hidden_sizes,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("obs_dim", obs_dim, 1),
            ("act_dim", act_dim, 1),
            ("target_dim", target_dim, 1),
            ("latent_dim", latent_dim, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"DynamicsModel.{name} must be an int >= {minimum}, got {value!r}"
                )
        if target_dim > obs_dim:
            raise ValueError(
                f"DynamicsModel.target_dim ({target_dim}) must be <= obs_dim ({obs_dim})"
            )
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"DynamicsModel.hidden_sizes must be ints >= 1, got {hidden_sizes!r}")
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.target_dim = target_dim
        self.latent_dim = latent_dim
        self.hidden_sizes = tuple(hidden_sizes)
        layers: list[nn.Module] = []
        width = obs_dim + act_dim + latent_dim
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, target_dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("delta_mean", torch.zeros(target_dim))
        self.register_buffer("delta_std", torch.ones(target_dim))

    @classmethod
    def from_config(
        cls, obs_dim: int, act_dim: int, target_dim: int, latent_dim: int, config: MAMLConfig
    ) -> DynamicsModel:
        """Build a model with ``config.hidden_sizes``."""
        return cls(obs_dim, act_dim, target_dim, latent_dim, config.hidden_sizes)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments as plain Python values (for checkpoints)."""
        return {
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "target_dim": self.target_dim,
            "latent_dim": self.latent_dim,
            "hidden_sizes": list(self.hidden_sizes),
        }

    def forward(self, obs: Tensor, action: Tensor, latent: Tensor | None = None) -> Tensor:
        """Predict the normalised delta, ``(B, target_dim)``, from obs ``(B, obs_dim)``,
        action ``(B, act_dim)`` and latent ``(B, latent_dim)`` (``None`` or width 0 if
        ``latent_dim`` is 0)."""
        if self.latent_dim > 0:
            if latent is None:
                raise ValueError(f"DynamicsModel needs a latent of width {self.latent_dim}")
            x = torch.cat([obs, action, latent], dim=-1)
        else:
            if latent is not None and latent.shape[-1] != 0:
                raise ValueError("DynamicsModel was built with latent_dim=0 but got a latent")
            x = torch.cat([obs, action], dim=-1)
        return self.net(x)

    def normalized_target(self, batch: TransitionBatch) -> Tensor:
        """``(B, target_dim)`` regression target ``(delta[:, :target_dim] - mean) / std``."""
        delta = (batch.next_obs - batch.obs)[:, : self.target_dim]
        return (delta - self.delta_mean) / self.delta_std

    def denormalize(self, normalized_delta: Tensor) -> Tensor:
        """Map a ``(..., target_dim)`` normalised delta back to observation units."""
        return normalized_delta * self.delta_std + self.delta_mean

    @torch.no_grad()
    def fit_normalizer(self, deltas: Tensor, min_std: float = 1e-6) -> None:
        """Set ``delta_mean`` / ``delta_std`` from example deltas.

        Args:
            deltas: ``(N, target_dim)`` or ``(N, obs_dim)`` (then the first ``target_dim``
                columns are used) of ``next_obs - obs`` from representative data, ``N >= 2``.
            min_std: floor for the std so constant dimensions do not blow up.
        """
        if deltas.dim() != 2 or deltas.shape[0] < 2 or deltas.shape[1] < self.target_dim:
            raise ValueError(
                f"fit_normalizer: deltas must be (N>=2, >= {self.target_dim}), "
                f"got {tuple(deltas.shape)}"
            )
        d = deltas[:, : self.target_dim].to(self.delta_mean)
        self.delta_mean.copy_(d.mean(dim=0))
        self.delta_std.copy_(d.std(dim=0).clamp_min(min_std))


AnyDynamics = DynamicsModel | TorqueGainDynamics


def make_dynamics(
    config: DynamicsConfig,
    obs_dim: int,
    act_dim: int,
    latent_dim: int,
    pd: PDStructure,
) -> AnyDynamics:
    """A fresh model of ``config.model`` (``pd``: the env's actuation, for torque_gain; the
    MLP predicts the first ``config.target_blocks`` observation blocks of ``act_dim``)."""
    if config.model == "torque_gain":
        return TorqueGainDynamics(
            obs_dim, act_dim, latent_dim, config.hidden_sizes, pd, init_step=config.head_init_step
        )
    return DynamicsModel(
        obs_dim, act_dim, config.target_blocks * act_dim, latent_dim, config.hidden_sizes
    )


def build_dynamics(spec: Mapping) -> AnyDynamics:
    """A dynamics model from its ``spec()`` (``kind`` absent: the plain MLP)."""
    if spec.get("kind", "mlp") == TorqueGainDynamics.kind:
        return TorqueGainDynamics(
            spec["obs_dim"],
            spec["act_dim"],
            spec["latent_dim"],
            tuple(spec["hidden_sizes"]),
            PDStructure.from_dict(spec["pd"]),
        )
    return DynamicsModel(
        spec["obs_dim"],
        spec["act_dim"],
        spec["target_dim"],
        latent_dim=spec["latent_dim"],
        hidden_sizes=tuple(spec["hidden_sizes"]),
    )


def make_checkpoint(model: AnyDynamics, config: MAMLConfig) -> dict[str, Any]:
    """Checkpoint of plain Python values and tensors (loadable with ``weights_only=True``)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_spec": model.spec(),
        "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
    }


def load_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[AnyDynamics, MAMLConfig]:
    """Rebuild ``(model, config)`` from :func:`make_checkpoint` output."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: unknown format {checkpoint.get('format')!r}")
    model = build_dynamics(checkpoint["model_spec"])
    state = checkpoint["model_state"]
    model.to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model, MAMLConfig.from_dict(checkpoint["config"])
