"""GrBAL-style MAML adaptation of a learned dynamics model, and action correction with it.

What is adapted
---------------
Following GrBAL (Nagabandi et al. 2019, "Learning to adapt in dynamic, real-world environments
through meta-reinforcement learning") the thing that adapts online is **not the policy** but a
**dynamics model**. This module holds the MAML machinery and the plain MLP model
:class:`DynamicsModel` ``f(obs, action, z) -> delta``, where ``delta`` is the first
``target_dim`` entries of ``next_obs - obs`` (e.g. the joint-velocity change), normalised per
dimension by a mean/std stored in the model (:meth:`DynamicsModel.fit_normalizer`), all of whose
weights adapt. ``z`` is the optional latent task code from the PEARL encoder (``latent_dim``
may be 0). A model may instead declare ``adapted_parameter_names`` (see :func:`adapted_names`):
then only those take inner steps -- the shipped structured model
(:mod:`metarl_ros.learning.torque_model`) adapts only a per-joint torque gain and bias.

The inner (adaptation) loss is the supervised one-step prediction error

    L(theta; B) = mean over the batch and target dims of (f_theta(o, a, z) - norm(delta))^2,

and the inner update is plain SGD, ``theta' = theta - lr * grad L`` repeated ``k`` times,
optionally with every step's global L2 norm clipped to ``max_step_norm``.

Why a dynamics model: a few gradient steps on a regression loss over the last few seconds of
real transitions are cheap, low-variance and have a ground truth -- unlike a few policy-gradient
steps on a handful of on-robot rollouts. MAML (meta-training through the inner update,
:func:`maml_loss`) chooses the initial weights so that those ``k`` steps on the *past* part of a
window minimise the error on the *following* part, which is exactly how the adapter uses it on
the robot (:class:`OnlineAdapter`). Because the inner step is plain SGD from the meta-learned
init, a damaged joint or an unexpected payload (dynamics that PEARL's latent cannot express)
can still be absorbed into the weights.

How the adapted model is used: the policy chose ``a_pi`` for the world that the un-adapted
meta-init model (plus latent) describes. :func:`correct_action` searches for the action whose
outcome under the *adapted* model matches the outcome ``a_pi`` would have had under the *prior*
model, with a trust-region penalty that keeps it close to ``a_pi`` (and within bounds).

Safety on the robot (:class:`OnlineAdapter`): adaptation always starts from the meta-init by
default, steps are bounded, the candidate weights are validated on held-out recent data and
rolled back if they predict worse than the weights currently in use, and weight sets are
published as immutable, versioned snapshots so the control loop never sees a half update.

Functional core: :func:`inner_adapt` / :func:`maml_loss` work on ``{name: tensor}`` parameter
dicts via :func:`torch.func.functional_call` and accept any ``nn.Module`` plus an optional
``loss_fn(module, params, batch)`` hook, so they also serve other models (the tests use a bare
``nn.Linear``).

Thread-safety note: ``functional_call`` temporarily swaps the tensors *inside the module object*,
so one module instance must not be used by two threads at once. The module-level functions
therefore are not thread-safe for a shared module; :class:`OnlineAdapter` gives every thread its
own private copy of the module (weights come from the snapshot dicts, not from the copy).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "AdaptationResult",
    "DynamicsModel",
    "LossFn",
    "MAMLConfig",
    "MAMLTrainer",
    "MetaStepStats",
    "OnlineAdapter",
    "ParamsSnapshot",
    "TransitionBatch",
    "correct_action",
    "dynamics_loss",
    "inner_adapt",
    "load_checkpoint",
    "make_checkpoint",
    "maml_loss",
    "adapted_names",
    "params_of",
]

LOGGER = logging.getLogger(__name__)

Params = dict[str, Tensor]
"""A ``{parameter name: tensor}`` dict as used by :func:`torch.func.functional_call`."""

LossFn = Callable[[nn.Module, Mapping[str, Tensor], Any], Tensor]
"""``loss_fn(module, params, batch) -> scalar`` evaluated at ``params`` (not the module's own)."""

_ADAPT_FROM = ("meta_init", "current")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransitionBatch:
    """A batch of ``B`` transitions ``(obs, action) -> next_obs`` (optionally with a latent).

    Attributes:
        obs: ``(B, obs_dim)`` observation at time t.
        action: ``(B, act_dim)`` action applied at time t.
        next_obs: ``(B, obs_dim)`` observation at time t+1.
        latent: ``(B, latent_dim)`` task latent ``z`` (e.g. the PEARL posterior mean), or
            ``None`` for a model with ``latent_dim == 0``.

    For :class:`OnlineAdapter` the rows must be in **time order** (oldest first): the most
    recent rows form the held-out part.
    """

    obs: Tensor
    action: Tensor
    next_obs: Tensor
    latent: Tensor | None = None

    def __post_init__(self) -> None:
        if self.obs.dim() != 2 or self.action.dim() != 2 or self.next_obs.dim() != 2:
            raise ValueError(
                "TransitionBatch: obs, action and next_obs must be 2-D (B, dim); got shapes "
                f"{tuple(self.obs.shape)}, {tuple(self.action.shape)}, "
                f"{tuple(self.next_obs.shape)}"
            )
        n = self.obs.shape[0]
        if self.action.shape[0] != n or self.next_obs.shape[0] != n:
            raise ValueError("TransitionBatch: obs, action and next_obs differ in batch size")
        if self.next_obs.shape != self.obs.shape:
            raise ValueError("TransitionBatch: next_obs must have the shape of obs")
        if self.latent is not None and (self.latent.dim() != 2 or self.latent.shape[0] != n):
            raise ValueError("TransitionBatch: latent must be (B, latent_dim) with the same B")

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def __getitem__(self, index: int | slice | Tensor) -> TransitionBatch:
        """Rows selected by an int, a slice, an index tensor or a mask (keeps 2-D shapes)."""
        if isinstance(index, int):
            index = slice(index, (index + 1) or None)
        return TransitionBatch(
            obs=self.obs[index],
            action=self.action[index],
            next_obs=self.next_obs[index],
            latent=None if self.latent is None else self.latent[index],
        )

    def to(self, *args: Any, **kwargs: Any) -> TransitionBatch:
        """Same as :meth:`torch.Tensor.to` applied to every field."""
        return TransitionBatch(
            obs=self.obs.to(*args, **kwargs),
            action=self.action.to(*args, **kwargs),
            next_obs=self.next_obs.to(*args, **kwargs),
            latent=None if self.latent is None else self.latent.to(*args, **kwargs),
        )

    @staticmethod
    def cat(batches: Sequence[TransitionBatch]) -> TransitionBatch:
        """Concatenate batches along the batch dimension (all with or all without latent)."""
        if not batches:
            raise ValueError("TransitionBatch.cat: need at least one batch")
        with_latent = [b.latent is not None for b in batches]
        if any(with_latent) and not all(with_latent):
            raise ValueError("TransitionBatch.cat: mixing batches with and without latent")
        return TransitionBatch(
            obs=torch.cat([b.obs for b in batches]),
            action=torch.cat([b.action for b in batches]),
            next_obs=torch.cat([b.next_obs for b in batches]),
            latent=torch.cat([b.latent for b in batches]) if all(with_latent) else None,  # type: ignore[misc]
        )


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MAMLConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"MAMLConfig.{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class MAMLConfig:
    """Hyper-parameters of the dynamics model, its MAML inner loop and the online adapter.

    Attributes:
        hidden_sizes: widths of the hidden ReLU layers of :class:`DynamicsModel`
            (``()`` gives a single affine layer).
        inner_steps: SGD steps of the inner loop (meta-training *and* online; keep them equal).
        inner_lr: step size of the inner SGD.
        first_order: meta-train with FOMAML (inner gradients detached) instead of full MAML.
        max_step_norm: bound on the global L2 norm of each inner update, ``None`` = unbounded.
        holdout_fraction: fraction of an online window (its most recent rows) held out to
            validate the adapted weights; the rest is adapted on. In ``(0, 1)``.
        rollback_tolerance: relative tolerance: the candidate is accepted iff
            ``loss_after <= loss_before * (1 + rollback_tolerance)``.
        correction_steps: projected-gradient steps of :func:`correct_action` (0 = off).
        correction_lr: step size of those steps (on the action, in action units).
        trust_weight: weight of ``||a - a_pi||^2`` in the correction objective.
        adapt_from: ``"meta_init"`` (GrBAL, default) or ``"current"`` (continue from the
            weights in use); see :class:`OnlineAdapter`.
        min_window: windows shorter than this are skipped by the background thread and
            rejected by :meth:`OnlineAdapter.adapt`.
    """

    hidden_sizes: tuple[int, ...] = (128, 128)
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    max_step_norm: float | None = 1.0
    holdout_fraction: float = 0.25
    rollback_tolerance: float = 0.01
    correction_steps: int = 10
    correction_lr: float = 0.5
    trust_weight: float = 0.1
    adapt_from: str = "meta_init"
    min_window: int = 8

    def __post_init__(self) -> None:
        sizes = self.hidden_sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
            raise ValueError(f"MAMLConfig.hidden_sizes must be a sequence of ints, got {sizes!r}")
        sizes = tuple(sizes)
        for width in sizes:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(
                    f"MAMLConfig.hidden_sizes must contain ints >= 1, got {self.hidden_sizes!r}"
                )
        object.__setattr__(self, "hidden_sizes", sizes)
        _check_int("inner_steps", self.inner_steps, 1)
        _check_float("inner_lr", self.inner_lr, positive=True)
        if not isinstance(self.first_order, bool):
            raise ValueError(f"MAMLConfig.first_order must be a bool, got {self.first_order!r}")
        if self.max_step_norm is not None:
            _check_float("max_step_norm", self.max_step_norm, positive=True)
        hf = self.holdout_fraction
        if isinstance(hf, bool) or not isinstance(hf, (int, float)) or not 0.0 < hf < 1.0:
            raise ValueError(f"MAMLConfig.holdout_fraction must be in (0, 1), got {hf!r}")
        _check_float("rollback_tolerance", self.rollback_tolerance, positive=False)
        _check_int("correction_steps", self.correction_steps, 0)
        _check_float("correction_lr", self.correction_lr, positive=True)
        _check_float("trust_weight", self.trust_weight, positive=False)
        if self.adapt_from not in _ADAPT_FROM:
            raise ValueError(
                f"MAMLConfig.adapt_from must be one of {_ADAPT_FROM}, got {self.adapt_from!r}"
            )
        _check_int("min_window", self.min_window, 2)


    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists, numbers, strings) -- safe for ``weights_only`` loading."""
        data = asdict(self)
        data["hidden_sizes"] = list(self.hidden_sizes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MAMLConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MAMLConfig: unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        if "hidden_sizes" in values and isinstance(values["hidden_sizes"], list):
            values["hidden_sizes"] = tuple(values["hidden_sizes"])
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


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
        hidden_sizes: Sequence[int] = (128, 128),
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
        """Predict the normalised delta.

        Args:
            obs: ``(B, obs_dim)``.
            action: ``(B, act_dim)``.
            latent: ``(B, latent_dim)``; must be ``None`` (or have width 0) if ``latent_dim``
                is 0.

        Returns:
            ``(B, target_dim)`` normalised predicted delta.
        """
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


def adapted_names(module: nn.Module) -> tuple[str, ...] | None:
    """The parameters a model adapts online (its ``adapted_parameter_names``), or None for
    all of them (:class:`DynamicsModel`)."""
    names = getattr(module, "adapted_parameter_names", None)
    return None if names is None else tuple(names)


def params_of(module: nn.Module) -> Params:
    """Detached copies of a module's parameters, ``{name: tensor}``."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# --------------------------------------------------------------------------------------------
# Functional MAML core
# --------------------------------------------------------------------------------------------


def dynamics_loss(
    model: nn.Module, params: Mapping[str, Tensor], batch: TransitionBatch
) -> Tensor:
    """Inner/outer loss: MSE between predicted and true normalised delta, at ``params``.

    ``model`` must be a :class:`DynamicsModel` (its normaliser buffers are used). Returns a
    scalar (mean over ``B`` and ``target_dim``).
    """
    pred = functional_call(model, dict(params), (batch.obs, batch.action, batch.latent))
    target = model.normalized_target(batch)  # type: ignore[operator]
    return torch.mean((pred - target) ** 2)


def inner_adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    steps: int,
    lr: float,
    first_order: bool = False,
    max_step_norm: float | None = None,
    loss_fn: LossFn | None = None,
    adapt_names: Collection[str] | None = None,
) -> Params:
    """Run ``steps`` plain SGD steps on ``loss_fn`` starting from ``params``.

    ``theta_{i+1} = theta_i - s_i * grad L(theta_i; batch)`` with ``s_i = lr``, or, when
    ``max_step_norm`` is set, ``s_i = lr * min(1, max_step_norm / (lr * ||grad||))`` so that the
    global L2 norm of every update is at most ``max_step_norm``. The clipping factor is treated
    as a constant (detached): in the meta-gradient it acts like a per-step learning rate.

    Second order by default: the inner gradients are built with ``create_graph=True`` so the
    returned tensors are differentiable functions of ``params`` including the Hessian term.
    With ``first_order=True`` (FOMAML) the inner gradients are detached, so d theta_k /
    d theta_0 = I. The forward values are identical in both modes.

    Args:
        model: module used as the functional template (its own parameters are ignored).
        params: ``{name: tensor}`` start point, e.g. ``dict(model.named_parameters())`` for
            meta-training. Tensors not requiring grad are treated as leaves (online use).
        batch: anything ``loss_fn`` accepts (:class:`TransitionBatch` for the default loss).
        steps: number of SGD steps (``>= 0``).
        lr: step size (``> 0``).
        first_order: drop second-order terms (FOMAML).
        max_step_norm: bound on each step's global update norm, or ``None``.
        loss_fn: ``loss_fn(model, params, batch) -> scalar``; default :func:`dynamics_loss`.
        adapt_names: the parameters that take inner steps (default: all). The others are
            passed through unchanged (still differentiable for the meta-gradient), as in
            ANIL-style MAML where only a head adapts.

    Returns:
        New ``{name: tensor}`` dict with the adapted parameters (``params`` is not modified).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"inner_adapt: steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"inner_adapt: lr must be > 0, got {lr!r}")
    if max_step_norm is not None and not max_step_norm > 0:
        raise ValueError(f"inner_adapt: max_step_norm must be > 0 or None, got {max_step_norm!r}")
    loss_fn = dynamics_loss if loss_fn is None else loss_fn
    names = list(params) if adapt_names is None else [k for k in params if k in adapt_names]
    if adapt_names is not None and len(names) != len(set(adapt_names)):
        missing = sorted(set(adapt_names) - set(params))
        raise ValueError(f"inner_adapt: adapt_names not in params: {missing}")
    current: Params = {
        k: v if v.requires_grad or k not in names else v.detach().requires_grad_(True)
        for k, v in params.items()
    }
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn(model, current, batch)
            grads = torch.autograd.grad(
                loss,
                [current[k] for k in names],
                create_graph=not first_order,
                allow_unused=True,
            )
            grads_list = [
                torch.zeros_like(current[k]) if g is None else (g.detach() if first_order else g)
                for k, g in zip(names, grads, strict=True)
            ]
            if max_step_norm is None:
                scale: Tensor | float = lr
            else:
                with torch.no_grad():
                    grad_norm = torch.sqrt(sum(torch.sum(g * g) for g in grads_list))
                    # max_step_norm > 0, so a zero gradient gives inf here -> clamped to 1.
                    scale = lr * torch.clamp(max_step_norm / (lr * grad_norm), max=1.0)
            current = {
                **current,
                **{k: current[k] - scale * g for k, g in zip(names, grads_list, strict=True)},
            }
    return current


def maml_loss(
    model: nn.Module,
    tasks_support: Sequence[Any],
    tasks_query: Sequence[Any],
    *,
    inner_steps: int,
    inner_lr: float,
    first_order: bool = False,
    max_step_norm: float | None = None,
    params: Mapping[str, Tensor] | None = None,
    loss_fn: LossFn | None = None,
    adapt_names: Collection[str] | None = None,
) -> Tensor:
    """MAML meta-objective: mean over tasks of the query loss at the adapted parameters.

    For task i: ``theta_i' = inner_adapt(theta, support_i)``; returns
    ``mean_i loss_fn(model, theta_i', query_i)``. Backpropagating it into ``theta`` (the
    module's parameters unless ``params`` is given) yields the (second- or first-order)
    meta-gradient. For GrBAL-style data, support = a window of past transitions and query =
    the transitions that follow it in the same episode.

    Returns:
        Scalar tensor with a graph back to ``params``.
    """
    if len(tasks_support) != len(tasks_query) or not tasks_support:
        raise ValueError("maml_loss: need the same, non-zero number of support and query batches")
    loss_fn = dynamics_loss if loss_fn is None else loss_fn
    theta = dict(model.named_parameters()) if params is None else dict(params)
    losses = []
    for support, query in zip(tasks_support, tasks_query, strict=True):
        adapted = inner_adapt(
            model,
            theta,
            support,
            inner_steps,
            inner_lr,
            first_order,
            max_step_norm,
            loss_fn,
            adapt_names,
        )
        losses.append(loss_fn(model, adapted, query))
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class MetaStepStats:
    """Result of one meta-update (or evaluation) over a batch of tasks.

    Attributes:
        pre_adapt_loss: mean query loss at the meta-parameters (no adaptation).
        post_adapt_loss: mean query loss after the inner adaptation on each task's support.
        meta_grad_norm: global norm of the meta-gradient before clipping (``nan`` for
            :meth:`MAMLTrainer.evaluate`).
        n_tasks: number of tasks.
    """

    pre_adapt_loss: float
    post_adapt_loss: float
    meta_grad_norm: float
    n_tasks: int


class MAMLTrainer:
    """Meta-trains a module's parameters with MAML (Adam as the meta-optimiser).

    Args:
        model: the module to meta-train (usually a :class:`DynamicsModel`).
        config: inner-loop settings (``inner_steps``, ``inner_lr``, ``first_order``,
            ``max_step_norm``) -- use the same config online.
        meta_lr: Adam learning rate of the outer loop.
        meta_grad_clip: clip the meta-gradient global norm to this (``None`` = off).
        loss_fn: optional custom loss (default :func:`dynamics_loss`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MAMLConfig,
        meta_lr: float = 1e-3,
        meta_grad_clip: float | None = 10.0,
        loss_fn: LossFn | None = None,
    ) -> None:
        if not meta_lr > 0:
            raise ValueError(f"MAMLTrainer: meta_lr must be > 0, got {meta_lr!r}")
        self.model = model
        self.config = config
        self.meta_grad_clip = meta_grad_clip
        self.loss_fn = dynamics_loss if loss_fn is None else loss_fn
        self.optimizer = torch.optim.Adam(model.parameters(), lr=meta_lr)

    def _post_loss(
        self, supports: Sequence[Any], queries: Sequence[Any], first_order: bool
    ) -> Tensor:
        cfg = self.config
        return maml_loss(
            self.model,
            supports,
            queries,
            inner_steps=cfg.inner_steps,
            inner_lr=cfg.inner_lr,
            first_order=first_order,
            max_step_norm=cfg.max_step_norm,
            loss_fn=self.loss_fn,
            adapt_names=adapted_names(self.model),
        )

    def _pre_loss(self, queries: Sequence[Any]) -> float:
        with torch.no_grad():
            theta = dict(self.model.named_parameters())
            return float(torch.stack([self.loss_fn(self.model, theta, q) for q in queries]).mean())

    def step(self, tasks: Sequence[tuple[Any, Any]]) -> MetaStepStats:
        """One meta-update from ``[(support_i, query_i), ...]`` (one pair per task)."""
        supports = [s for s, _ in tasks]
        queries = [q for _, q in tasks]
        pre = self._pre_loss(queries)
        self.optimizer.zero_grad(set_to_none=True)
        post = self._post_loss(supports, queries, self.config.first_order)
        post.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.meta_grad_clip is not None:
            norm = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.meta_grad_clip)
            )
        else:
            norm = float(torch.sqrt(sum(torch.sum(g * g) for g in grads))) if grads else 0.0
        self.optimizer.step()
        return MetaStepStats(pre, float(post.detach()), norm, len(tasks))

    def evaluate(self, tasks: Sequence[tuple[Any, Any]]) -> MetaStepStats:
        """Pre/post-adaptation query losses without updating anything."""
        supports = [s for s, _ in tasks]
        queries = [q for _, q in tasks]
        pre = self._pre_loss(queries)
        post = self._post_loss(supports, queries, first_order=True)
        return MetaStepStats(pre, float(post.detach()), math.nan, len(tasks))


# --------------------------------------------------------------------------------------------
# Action correction
# --------------------------------------------------------------------------------------------


def _same_params(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    return all(a[k] is b[k] or torch.equal(a[k], b[k]) for k in a)


def correct_action(
    model: nn.Module,
    obs: Tensor,
    action: Tensor,
    z: Tensor | None,
    params_prior: Mapping[str, Tensor],
    params_adapted: Mapping[str, Tensor],
    steps: int,
    lr: float,
    trust_weight: float,
    action_low: float | Tensor = -1.0,
    action_high: float | Tensor = 1.0,
) -> Tensor:
    """Correct the policy action for the adapted dynamics.

    With ``d = f_prior(obs, a_pi, z)`` (what the policy expected its action to do), returns an
    approximate minimiser of

        J(a) = ||f_adapted(obs, a, z) - d||^2 + trust_weight * ||a - a_pi||^2

    by ``steps`` projected gradient steps ``a <- clip(a - lr * dJ/da, low, high)`` from
    ``clip(a_pi)``. The residual is measured in the model's normalised delta units. If the
    two parameter sets are equal the result is exactly ``clip(a_pi)`` (zero correction). The
    result is always within bounds; no autograd graph survives the call.

    Args:
        model: the :class:`DynamicsModel` template (not thread-safe to share; see module doc).
        obs: ``(obs_dim,)`` or ``(B, obs_dim)``.
        action: ``a_pi``, ``(act_dim,)`` or ``(B, act_dim)``.
        z: ``(latent_dim,)`` / ``(B, latent_dim)`` or ``None``.
        params_prior: parameters the policy "believes in" (the meta-init).
        params_adapted: adapted parameters.
        steps: gradient steps (0 = no correction, only clipping).
        lr: step size, stable for ``lr < 1 / L`` where ``L`` bounds the curvature of ``J``.
        trust_weight: ``>= 0`` penalty on moving away from ``a_pi``.
        action_low, action_high: bounds, scalars or ``(act_dim,)`` tensors.

    Returns:
        Corrected action with the shape of ``action``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"correct_action: steps must be an int >= 0, got {steps!r}")
    if not lr > 0 or not trust_weight >= 0:
        raise ValueError("correct_action: lr must be > 0 and trust_weight >= 0")
    single = action.dim() == 1
    if single:
        obs = obs.unsqueeze(0)
        action = action.unsqueeze(0)
        z = None if z is None else z.unsqueeze(0)
    a_pi = action.detach()
    low = torch.as_tensor(action_low, dtype=a_pi.dtype, device=a_pi.device)
    high = torch.as_tensor(action_high, dtype=a_pi.dtype, device=a_pi.device)
    a = torch.clamp(a_pi, low, high)
    if steps > 0 and not _same_params(params_prior, params_adapted):
        obs = obs.detach()
        z = None if z is None else z.detach()
        prior = {k: v.detach() for k, v in params_prior.items()}
        adapted = {k: v.detach() for k, v in params_adapted.items()}
        with torch.no_grad():
            desired = functional_call(model, prior, (obs, a_pi, z))
        with torch.enable_grad():
            for _ in range(steps):
                a_var = a.detach().requires_grad_(True)
                pred = functional_call(model, adapted, (obs, a_var, z))
                objective = torch.sum((pred - desired) ** 2) + trust_weight * torch.sum(
                    (a_var - a_pi) ** 2
                )
                (grad,) = torch.autograd.grad(objective, a_var)
                a = torch.clamp(a_var.detach() - lr * grad, low, high)
    a = a.detach()
    return a.squeeze(0) if single else a


# --------------------------------------------------------------------------------------------
# Online adapter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamsSnapshot:
    """An immutable, versioned set of weights. ``params`` is a read-only mapping.

    Never modify the tensors in place: the same tensors may be in use by other threads.
    """

    version: int
    params: Mapping[str, Tensor]


@dataclass(frozen=True)
class AdaptationResult:
    """Outcome of :meth:`OnlineAdapter.adapt`.

    Attributes:
        accepted: the candidate weights were published.
        rolled_back: the candidate was rejected by the held-out check and the previous
            weights were kept exactly.
        reason: ``"improved"``, ``"held-out loss worse"``, ``"non-finite"`` or
            ``"superseded"`` (a :meth:`OnlineAdapter.reset` happened meanwhile; discarded).
        loss_before: held-out loss of the weights in use when the call started.
        loss_after: held-out loss of the candidate weights.
        loss_meta_init: held-out loss of the meta-init (for diagnostics).
        step_norm: global L2 norm of ``candidate - start`` over all parameters.
        duration_s: wall-clock duration of the call.
        n_adapt: transitions adapted on; ``n_holdout``: transitions held out.
        version: version of the weights in use after the call.
    """

    accepted: bool
    rolled_back: bool
    reason: str
    loss_before: float
    loss_after: float
    loss_meta_init: float
    step_norm: float
    duration_s: float
    n_adapt: int
    n_holdout: int
    version: int


class OnlineAdapter:
    """On-robot GrBAL adaptation with bounded steps, held-out validation and rollback.

    ``adapt(window)`` splits a time-ordered window into the older ``1 - holdout_fraction``
    (adapted on) and the most recent ``holdout_fraction`` (held out). Holding out the *latest*
    rows mirrors the meta-training objective (adapt on the past, predict the future) and tests
    exactly what the correction needs: prediction of the near future, not interpolation
    between correlated neighbouring samples.

    By default (``adapt_from="meta_init"``) every adaptation starts from the meta-learned
    init, as in GrBAL: meta-training only optimised the result of ``inner_steps`` steps *from
    the init*, so chained adaptations leave that regime, and a bad window cannot accumulate
    drift. ``adapt_from="current"`` continues from the weights in use (useful when the
    change is persistent and more steps help); the held-out check guards both.

    The candidate is accepted iff its held-out loss is finite and at most
    ``loss_before * (1 + rollback_tolerance)`` where ``loss_before`` is the held-out loss of
    the weights currently in use; otherwise the current weights stay (same tensor objects).

    Thread safety: the weights in use are one :class:`ParamsSnapshot` reference, replaced
    under a lock by a fully built new snapshot; readers (:meth:`snapshot`,
    :meth:`current_params`, :meth:`correct_action`) only take that reference, so they never
    see a partial update. ``adapt`` calls are serialised among themselves. Each thread gets its
    own copy of the model module for ``functional_call``.

    Args:
        model: a (meta-trained) :class:`DynamicsModel`; its current parameters become the
            meta-init unless ``meta_params`` is given. Its normaliser buffers are copied.
        config: a :class:`MAMLConfig`.
        meta_params: optional explicit meta-init ``{name: tensor}``.
        on_update: optional callback ``(snapshot, result)`` called after a new snapshot is
            published (from the adapting thread; keep it short, it must not raise).
    """

    def __init__(
        self,
        model: DynamicsModel,
        config: MAMLConfig,
        meta_params: Mapping[str, Tensor] | None = None,
        on_update: Callable[[ParamsSnapshot, AdaptationResult], None] | None = None,
    ) -> None:
        self.config = config
        with torch.no_grad():
            self._template = copy.deepcopy(model)
        source = params_of(model) if meta_params is None else meta_params
        expected = {name for name, _ in model.named_parameters()}
        if set(source) != expected:
            raise ValueError("OnlineAdapter: meta_params keys do not match the model parameters")
        self._meta = MappingProxyType({k: v.detach().clone() for k, v in source.items()})
        self._on_update = on_update
        self._state_lock = threading.Lock()
        self._adapt_lock = threading.Lock()
        self._template_lock = threading.Lock()
        self._local = threading.local()
        self._snapshot = ParamsSnapshot(0, self._meta)
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._error_count = 0
        self._last_error: BaseException | None = None
        self._adapt_count = 0
        self._rollback_count = 0
        self._last_result: AdaptationResult | None = None

    # -- readers -------------------------------------------------------------------------------

    @property
    def meta_params(self) -> Mapping[str, Tensor]:
        """The meta-learned init (read-only, never modified)."""
        return self._meta

    def snapshot(self) -> ParamsSnapshot:
        """The weights in use together with their version (one atomic read)."""
        with self._state_lock:
            return self._snapshot

    def current_params(self) -> Mapping[str, Tensor]:
        """The weights in use (read-only mapping; do not modify the tensors)."""
        return self.snapshot().params

    @property
    def version(self) -> int:
        return self.snapshot().version

    @property
    def error_count(self) -> int:
        """Exceptions caught in the background thread."""
        with self._state_lock:
            return self._error_count

    @property
    def last_error(self) -> BaseException | None:
        with self._state_lock:
            return self._last_error

    @property
    def adapt_count(self) -> int:
        with self._state_lock:
            return self._adapt_count

    @property
    def rollback_count(self) -> int:
        with self._state_lock:
            return self._rollback_count

    @property
    def last_result(self) -> AdaptationResult | None:
        with self._state_lock:
            return self._last_result

    def _module(self) -> nn.Module:
        """This thread's private copy of the model (``functional_call`` mutates modules)."""
        module = getattr(self._local, "module", None)
        if module is None:
            with self._template_lock, torch.no_grad():
                module = copy.deepcopy(self._template)
            self._local.module = module
        return module

    # -- adaptation ----------------------------------------------------------------------------

    def split(self, window: TransitionBatch) -> tuple[TransitionBatch, TransitionBatch]:
        """Split a time-ordered window into (adaptation part, held-out most recent part)."""
        n = len(window)
        if n < self.config.min_window:
            raise ValueError(
                f"OnlineAdapter.adapt: window has {n} transitions, min_window is "
                f"{self.config.min_window}"
            )
        n_hold = min(n - 1, max(1, round(n * self.config.holdout_fraction)))
        n_adapt = n - n_hold
        return window[:n_adapt], window[n_adapt:]

    def adapt(self, window: TransitionBatch) -> AdaptationResult:
        """Adapt to a time-ordered window; publish the result only if it validates.

        Runs ``config.inner_steps`` bounded SGD steps (values are those of the meta-training
        inner loop; no second-order graph is needed online) on the older part of the window,
        compares held-out losses and accepts or rolls back. See the class docstring.
        """
        t0 = time.perf_counter()
        cfg = self.config
        adapt_part, held_out = self.split(window)
        module = self._module()
        with self._adapt_lock:
            base = self.snapshot()
            start = self._meta if cfg.adapt_from == "meta_init" else base.params
            candidate_graph = inner_adapt(
                module,
                start,
                adapt_part,
                cfg.inner_steps,
                cfg.inner_lr,
                first_order=True,
                max_step_norm=cfg.max_step_norm,
                adapt_names=adapted_names(module),
            )
            candidate = {k: v.detach() for k, v in candidate_graph.items()}
            del candidate_graph
            with torch.no_grad():
                loss_before = float(dynamics_loss(module, base.params, held_out))
                loss_after = float(dynamics_loss(module, candidate, held_out))
                loss_init = (
                    loss_before
                    if base.params is self._meta
                    else float(dynamics_loss(module, self._meta, held_out))
                )
                step_norm = math.sqrt(
                    sum(float(torch.sum((candidate[k] - start[k]) ** 2)) for k in candidate)
                )
            finite = math.isfinite(loss_after) and all(
                bool(torch.isfinite(v).all()) for v in candidate.values()
            )
            if not finite:
                accepted, reason = False, "non-finite"
            elif loss_after <= loss_before * (1.0 + cfg.rollback_tolerance):
                accepted, reason = True, "improved"
            else:
                accepted, reason = False, "held-out loss worse"
            new_snapshot: ParamsSnapshot | None = None
            with self._state_lock:
                superseded = self._snapshot is not base
                if accepted and superseded:
                    accepted, reason = False, "superseded"
                if accepted:
                    new_snapshot = ParamsSnapshot(base.version + 1, MappingProxyType(candidate))
                    self._snapshot = new_snapshot
                rolled_back = not accepted and reason != "superseded"
                self._adapt_count += 1
                self._rollback_count += int(rolled_back)
                result = AdaptationResult(
                    accepted=accepted,
                    rolled_back=rolled_back,
                    reason=reason,
                    loss_before=loss_before,
                    loss_after=loss_after,
                    loss_meta_init=loss_init,
                    step_norm=step_norm,
                    duration_s=time.perf_counter() - t0,
                    n_adapt=len(adapt_part),
                    n_holdout=len(held_out),
                    version=self._snapshot.version,
                )
                self._last_result = result
        if rolled_back:
            LOGGER.info(
                "MAML adaptation rolled back (%s): held-out loss %.4g -> %.4g",
                reason,
                loss_before,
                loss_after,
            )
        if new_snapshot is not None and self._on_update is not None:
            self._on_update(new_snapshot, result)
        return result

    def reset(self) -> ParamsSnapshot:
        """Go back to the meta-init (as a new version); an adaptation in flight is discarded."""
        with self._state_lock:
            self._snapshot = ParamsSnapshot(self._snapshot.version + 1, self._meta)
            return self._snapshot

    # -- correction ----------------------------------------------------------------------------

    def correct_action(
        self,
        obs: Tensor,
        action: Tensor,
        z: Tensor | None = None,
        action_low: float | Tensor = -1.0,
        action_high: float | Tensor = 1.0,
        snapshot: ParamsSnapshot | None = None,
    ) -> Tensor:
        """:func:`correct_action` with the meta-init as prior and the weights in use (or the
        given ``snapshot``) as adapted model; shapes as there. Safe to call from any thread."""
        snap = self.snapshot() if snapshot is None else snapshot
        cfg = self.config
        return correct_action(
            self._module(),
            obs,
            action,
            z,
            self._meta,
            snap.params,
            cfg.correction_steps,
            cfg.correction_lr,
            cfg.trust_weight,
            action_low,
            action_high,
        )

    # -- background thread ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_background(
        self, get_window: Callable[[], TransitionBatch | None], period_s: float
    ) -> None:
        """Adapt every ``period_s`` seconds on ``get_window()`` in a daemon thread.

        ``get_window`` returns the latest time-ordered window, or ``None`` to skip (windows
        shorter than ``min_window`` are skipped too). Any exception from ``get_window`` or
        ``adapt`` is logged, counted in :attr:`error_count` / :attr:`last_error` and the loop
        continues.
        """
        if not period_s > 0:
            raise ValueError(f"start_background: period_s must be > 0, got {period_s!r}")
        if self.running:
            raise RuntimeError("OnlineAdapter: background adaptation already running")
        self._stop_event = threading.Event()
        stop_event = self._stop_event

        def loop() -> None:
            while not stop_event.is_set():
                t0 = time.monotonic()
                try:
                    window = get_window()
                    if window is not None and len(window) >= self.config.min_window:
                        self.adapt(window)
                except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                    LOGGER.exception("MAML background adaptation failed")
                    with self._state_lock:
                        self._error_count += 1
                        self._last_error = exc
                stop_event.wait(max(0.0, period_s - (time.monotonic() - t0)))

        self._thread = threading.Thread(target=loop, name="maml-online-adapter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background thread (waits up to ``timeout`` for the current adaptation)."""
        self._stop_event.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                self._thread = None


# --------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------


def make_checkpoint(model: DynamicsModel, config: MAMLConfig) -> dict[str, Any]:
    """Checkpoint of plain Python values and tensors (loadable with ``weights_only=True``)."""
    return {
        "format": "metarl_ros.maml/1",
        "model_spec": model.spec(),
        "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
    }


def load_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[DynamicsModel, MAMLConfig]:
    """Rebuild ``(model, config)`` from :func:`make_checkpoint` output."""
    if checkpoint.get("format") != "metarl_ros.maml/1":
        raise ValueError(f"load_checkpoint: unknown format {checkpoint.get('format')!r}")
    spec = dict(checkpoint["model_spec"])
    spec["hidden_sizes"] = tuple(spec["hidden_sizes"])
    model = DynamicsModel(**spec)
    state = checkpoint["model_state"]
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    model.load_state_dict(state)
    return model, MAMLConfig.from_dict(checkpoint["config"])
