"""Functional MAML: the inner (adaptation) loop, the meta-objective and a meta-trainer.

What is adapted
---------------
Following GrBAL (Nagabandi et al. 2019, "Learning to adapt in dynamic, real-world environments
through meta-reinforcement learning") the thing that adapts online is **not the policy** but a
**dynamics model** (:mod:`metarl_ros.learning.dynamics_models`). The inner (adaptation) loss is
the supervised one-step prediction error

    L(theta; B) = mean over the batch and target dims of (f_theta(o, a, z) - norm(delta))^2,

and the inner update is plain SGD, ``theta' = theta - lr * grad L`` repeated ``k`` times,
optionally with every step's global L2 norm clipped to ``max_step_norm``. A model may declare
``adapted_parameter_names`` (see :func:`adapted_names`): then only those take inner steps.

Why a dynamics model: a few gradient steps on a regression loss over the last few seconds of
real transitions are cheap, low-variance and have a ground truth -- unlike a few policy-gradient
steps on a handful of on-robot rollouts. MAML (meta-training through the inner update,
:func:`maml_loss`) chooses the initial weights so that those ``k`` steps on the *past* part of a
window minimise the error on the *following* part, which is exactly how the online adapter
uses it on the robot (:mod:`metarl_ros.learning.online_adapter`). Because the inner step is
plain SGD from the meta-learned init, a damaged joint or an unexpected payload (dynamics that
PEARL's latent cannot express) can still be absorbed into the weights.

The functions work on ``{name: tensor}`` parameter dicts via
:func:`torch.func.functional_call` and accept any ``nn.Module`` plus an optional
``loss_fn(module, params, batch)`` hook, so they also serve other models (the tests use a bare
``nn.Linear``). ``functional_call`` temporarily swaps the tensors *inside the module object*,
so one module instance must not be used by two threads at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarl_ros.learning.dynamics_config import MAMLConfig
from metarl_ros.learning.transitions import TransitionBatch

Params = dict[str, Tensor]
"""A ``{parameter name: tensor}`` dict as used by :func:`torch.func.functional_call`."""

LossFn = Callable[[nn.Module, Mapping[str, Tensor], Any], Tensor]
"""``loss_fn(module, params, batch) -> scalar`` evaluated at ``params`` (not the module's own)."""


def adapted_names(module: nn.Module) -> tuple[str, ...] | None:
    """The parameters a model adapts online (its ``adapted_parameter_names``), or None for
    all of them (:class:`~metarl_ros.learning.dynamics_models.DynamicsModel`)."""
    names = getattr(module, "adapted_parameter_names", None)
    return None if names is None else tuple(names)


def params_of(module: nn.Module) -> Params:
    """Detached copies of a module's parameters, ``{name: tensor}``."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def dynamics_loss(
    model: nn.Module, params: Mapping[str, Tensor], batch: TransitionBatch
) -> Tensor:
    """Inner/outer loss: MSE between predicted and true normalised delta, at ``params``.

    ``model`` must be a dynamics model (its ``normalized_target`` is used). Returns a scalar
    (mean over ``B`` and ``target_dim``).
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
        model: the module to meta-train (usually a dynamics model).
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
