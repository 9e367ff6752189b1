"""A structured dynamics model whose online adaptation is a per-joint torque gain and bias.

Why not adapt a plain MLP ``f(obs, action, z)``: fitted on closed-loop data, where the action
is a function of the state, the MLP's action sensitivity ``df/da`` is poorly identified, and
inverting it to correct an action amplifies that error (measured: the MLP-based correction
made tracking worse on every split, ``docs/LEARNING.md``). Here the action enters through the
physics we know:

* the actuators apply ``tau = Kp (q_ref - q) + Kd (qd_ref - qd) + a * action_scale`` (the
  fixed PD of the env plus the policy's residual), which is computable from the observation;
  in action units ``u = a + PD(obs) / action_scale``;
* the change of joint velocity over one control step is, to first order, affine in the
  applied torque with a positive per-joint sensitivity (the diagonal of ``M^-1 dt``).

So the model is, per joint ``i`` and in normalised units of the velocity change::

    delta_v_i = drift_i(obs, z) + k_i * b_i(obs, z) * u_i + beta_i

with ``drift`` and ``b > 0`` from an MLP on ``[obs, z]`` (meta-trained, frozen online) and
the **head** ``(k, beta)`` -- 2 numbers per joint -- the only parameters adapted online. A
weaker motor (strength ``s``) shows up as ``k_i -> s``; an unmodelled load or friction as
``beta_i``. The loss is quadratic in the head, so a few SGD steps get far; inverting it is
well posed and closed form (:meth:`TorqueGainDynamics.correction`). The head is stored
pre-scaled by per-joint meta-learned step sizes (``k = 1 + s_k * k_raw``,
``beta = s_b * beta_raw``: Meta-SGD by re-parameterisation), so the plain SGD inner loop of
:mod:`metarl_ros.learning.maml_core` takes well-conditioned steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

GAIN_RANGE = (0.05, 12.0)
"""The effective torque gain is clamped to this range (a motor at 5 % .. 12x the prior)."""


@dataclass(frozen=True)
class PDStructure:
    """What the model needs to know about the env's actuation (all per joint, length ``n``).

    ``kp``, ``kd``: the fixed PD gains (N*m/rad, N*m*s/rad); ``action_scale``: N*m per unit
    action; ``position_error_scale`` / ``velocity_error_scale`` / ``velocity_scale``: the
    observation scalings (``metarl_ros.control.law.build_observation``).
    """

    kp: tuple[float, ...]
    kd: tuple[float, ...]
    action_scale: tuple[float, ...]
    position_error_scale: float
    velocity_error_scale: float
    velocity_scale: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kp": list(self.kp),
            "kd": list(self.kd),
            "action_scale": list(self.action_scale),
            "position_error_scale": self.position_error_scale,
            "velocity_error_scale": self.velocity_error_scale,
            "velocity_scale": self.velocity_scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PDStructure:
        return cls(
            kp=tuple(float(v) for v in data["kp"]),
            kd=tuple(float(v) for v in data["kd"]),
            action_scale=tuple(float(v) for v in data["action_scale"]),
            position_error_scale=float(data["position_error_scale"]),
            velocity_error_scale=float(data["velocity_error_scale"]),
            velocity_scale=float(data["velocity_scale"]),
        )


class TorqueGainDynamics(nn.Module):
    """``delta_v = drift(obs, z) + k * b(obs, z) * u + beta`` (module doc).

    Observation layout (blocks of ``n`` joints): ``[q - q0, qd * vs, (q_ref - q) * ps,
    (qd_ref - qd) * ves, ...]``; the target is the change of block 1 over one control step,
    normalised by ``delta_mean`` / ``delta_std`` (:meth:`fit_normalizer`).

    Args:
        obs_dim: observation width (``>= 4 n``).
        act_dim: ``n``, the number of joints.
        latent_dim: width of the task latent ``z`` (0: none).
        hidden_sizes: widths of the shared trunk on ``[obs, z]``.
        pd: the actuation structure.
        init_step: initial per-joint step-size multiplier of the head (meta-learned after).
    """

    kind = "torque_gain"
    adapted_parameter_names: tuple[str, ...] = ("gain_raw", "bias_raw")

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        hidden_sizes: Sequence[int],
        pd: PDStructure,
        init_step: float = 1.0,
    ) -> None:
        super().__init__()
        n = act_dim
        if obs_dim < 4 * n:
            raise ValueError(f"TorqueGainDynamics: obs_dim {obs_dim} < 4 * act_dim ({4 * n})")
        for name in ("kp", "kd", "action_scale"):
            if len(getattr(pd, name)) != n:
                raise ValueError(f"TorqueGainDynamics: pd.{name} must have {n} entries")
        if min(pd.action_scale) <= 0:
            raise ValueError("TorqueGainDynamics: pd.action_scale must be positive")
        self.obs_dim, self.act_dim, self.latent_dim = obs_dim, act_dim, latent_dim
        self.target_dim = n
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.pd = pd
        layers: list[nn.Module] = []
        width = obs_dim + latent_dim
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.drift = nn.Linear(width, n)
        self.sensitivity = nn.Linear(width, n)
        self.gain_raw = nn.Parameter(torch.zeros(n))
        self.bias_raw = nn.Parameter(torch.zeros(n))
        self.gain_log_step = nn.Parameter(torch.full((n,), float(torch.tensor(init_step).log())))
        self.bias_log_step = nn.Parameter(torch.full((n,), float(torch.tensor(init_step).log())))
        scale = torch.tensor(pd.action_scale)
        self.register_buffer("kp_u", torch.tensor(pd.kp) / pd.position_error_scale / scale)
        self.register_buffer("kd_u", torch.tensor(pd.kd) / pd.velocity_error_scale / scale)
        self.register_buffer("delta_mean", torch.zeros(n))
        self.register_buffer("delta_std", torch.ones(n))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments as plain Python values (for checkpoints)."""
        return {
            "kind": self.kind,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "target_dim": self.target_dim,
            "latent_dim": self.latent_dim,
            "hidden_sizes": list(self.hidden_sizes),
            "pd": self.pd.to_dict(),
        }

    # ------------------------------------------------------------------ pieces

    def total_torque(self, obs: Tensor, action: Tensor) -> Tensor:
        """``u = a + PD(obs) / action_scale``: the commanded torque in action units, (B, n)."""
        n = self.act_dim
        return action + self.kp_u * obs[:, 2 * n : 3 * n] + self.kd_u * obs[:, 3 * n : 4 * n]

    def head(self) -> tuple[Tensor, Tensor]:
        """Effective ``(k, beta)``, each (n,): torque gain (clamped to ``GAIN_RANGE``) and
        bias."""
        return head_at(
            {
                "gain_raw": self.gain_raw,
                "bias_raw": self.bias_raw,
                "gain_log_step": self.gain_log_step,
                "bias_log_step": self.bias_log_step,
            }
        )

    def parts(self, obs: Tensor, latent: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(drift, b)``, each (B, n), in normalised units; ``b > 0``."""
        x = obs if self.latent_dim == 0 else torch.cat([obs, self._latent(latent)], dim=-1)
        h = self.trunk(x)
        return self.drift(h), F.softplus(self.sensitivity(h)) + 1e-3

    def _latent(self, latent: Tensor | None) -> Tensor:
        if latent is None or latent.shape[-1] != self.latent_dim:
            raise ValueError(f"TorqueGainDynamics needs a latent of width {self.latent_dim}")
        return latent

    def forward(self, obs: Tensor, action: Tensor, latent: Tensor | None = None) -> Tensor:
        """Normalised predicted velocity change, (B, n), from obs (B, obs_dim), action (B, n)
        and latent (B, latent_dim) or None."""
        if self.latent_dim == 0 and latent is not None and latent.shape[-1] != 0:
            raise ValueError("TorqueGainDynamics was built with latent_dim=0 but got a latent")
        drift, b = self.parts(obs, latent)
        k, beta = self.head()
        return drift + k * b * self.total_torque(obs, action) + beta

    def normalized_target(self, batch: Any) -> Tensor:
        """(B, n) normalised change of the velocity block from a ``TransitionBatch``."""
        n = self.act_dim
        delta = batch.next_obs[:, n : 2 * n] - batch.obs[:, n : 2 * n]
        return (delta - self.delta_mean) / self.delta_std

    @torch.no_grad()
    def fit_normalizer(self, deltas: Tensor, min_std: float = 1e-6) -> None:
        """Set the target normaliser from ``(N, obs_dim)`` example ``next_obs - obs``."""
        n = self.act_dim
        if deltas.dim() != 2 or deltas.shape[0] < 2 or deltas.shape[1] < 2 * n:
            raise ValueError(
                f"fit_normalizer: deltas must be (N>=2, >= {2 * n}), got {tuple(deltas.shape)}"
            )
        d = deltas[:, n : 2 * n].to(self.delta_mean)
        self.delta_mean.copy_(d.mean(dim=0))
        self.delta_std.copy_(d.std(dim=0).clamp_min(min_std))

    # ------------------------------------------------------------------ inversion

    @torch.no_grad()
    def correction(
        self,
        obs: Tensor,
        action: Tensor,
        latent: Tensor | None,
        params_reference: Mapping[str, Tensor],
        params_now: Mapping[str, Tensor],
    ) -> Tensor:
        """Action change ``da`` (B, n) such that the torque effect under ``params_now``
        equals the effect ``action`` had under ``params_reference``:

            k b (u + da) + beta = k_ref b u + beta_ref
            => da = (k_ref / k - 1) u + (beta_ref - beta) / (k b)

        Closed form, no search; zero when the two heads are equal. Unbounded: the caller
        bounds it.
        """
        k_ref, beta_ref = head_at(params_reference)
        k, beta = head_at(params_now)
        _, b = self.parts_at(params_now, obs, latent)
        u = self.total_torque(obs, action)
        return (k_ref / k - 1.0) * u + (beta_ref - beta) / (k * b)

    def parts_at(
        self, params: Mapping[str, Tensor], obs: Tensor, latent: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`parts` evaluated with the weights in ``params`` (not the module's own)."""

        def sub(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}

        x = obs if self.latent_dim == 0 else torch.cat([obs, self._latent(latent)], dim=-1)
        h = functional_call(self.trunk, sub("trunk."), (x,))
        drift = functional_call(self.drift, sub("drift."), (h,))
        b = F.softplus(functional_call(self.sensitivity, sub("sensitivity."), (h,))) + 1e-3
        return drift, b


def head_at(params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Effective head ``(k, beta)`` (each (n,)) of a :class:`TorqueGainDynamics` parameter
    dict."""
    k = 1.0 + params["gain_log_step"].exp() * params["gain_raw"]
    return k.clamp(*GAIN_RANGE), params["bias_log_step"].exp() * params["bias_raw"]
