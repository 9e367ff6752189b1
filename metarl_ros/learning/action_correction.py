"""Action correction with an adapted dynamics model.

The policy chose ``a_pi`` for the world that the un-adapted meta-init model (plus latent)
describes. :func:`correct_action` searches for the action whose outcome under the *adapted*
model matches the outcome ``a_pi`` would have had under the *prior* model, with a trust-region
penalty that keeps it close to ``a_pi`` (and within bounds). (The structured torque-gain model
inverts its head in closed form instead: ``TorqueGainDynamics.correction``.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call


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
        model: the dynamics model template (``functional_call`` swaps its tensors inside
            it: not thread-safe to share).
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
