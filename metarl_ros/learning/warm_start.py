"""Warm-start a conditioned agent from one trained without (or with another) condition.

Curriculum used for the shipped models: first learn precise tracking of the intact robot
(``nominal``), then meta-train on the fault distribution starting from it. The actor's and
critics' first layers gain input columns for the condition (PEARL's ``z`` or the oracle's task
vector); those start at zero, so the warm-started agent *is* the source policy until training
teaches it to use the condition. The encoder starts fresh.

With ``critic_condition="random"`` the critics' condition columns keep their fresh random
initialization instead (the actor's still start at zero, so the start policy is unchanged).
Zero columns give PEARL's encoder no Bellman gradient at the start (d loss / d z passes
through them), while the KL term pulls every posterior to the prior from the first update:
the latent dimensions that the critic does not pick up early collapse (docs/LEARNING.md).

Input layouts (see :mod:`metarl_ros.learning.agent`): actor ``[obs, cond]``, critic
``[obs, cond, action]``.
"""

from __future__ import annotations

import torch

from metarl_ros.learning.agent import ConditionedSAC
from metarl_ros.learning.checkpoint import CheckpointError


def _expand_inputs(
    source: torch.Tensor, target: torch.Tensor, obs_dim: int, tail: int, keep_condition: bool
) -> torch.Tensor:
    """Copy ``source``'s input slices ``[obs | tail]`` into ``target``; the condition columns in
    between are zeros, or ``target``'s own with ``keep_condition``. The input axis is dim 1
    both for nn.Linear weights (out, in) and for EnsembleLinear weights (E, in, out)."""
    out = target.clone() if keep_condition else torch.zeros_like(target)
    out[:, :obs_dim] = source[:, :obs_dim]
    if tail:
        out[:, -tail:] = source[:, -tail:]
    return out


def warm_start(
    agent: ConditionedSAC,
    source_state: dict[str, torch.Tensor],
    source_spec: dict,
    source_name: str,
    critic_condition: str = "zero",
) -> list[str]:
    """Load ``source_state`` into ``agent`` (actor, critics, temperature); returns what was
    copied. ``critic_condition`` is ``"zero"`` or ``"random"``: how the critics' (and target
    critics') condition columns start; the actor's always start at zero. Raises
    :class:`CheckpointError` if the networks do not correspond."""
    if critic_condition not in ("zero", "random"):
        raise ValueError(f"critic_condition must be 'zero' or 'random', got {critic_condition!r}")
    spec = agent.spec
    for field in ("obs_dim", "act_dim", "actor_hidden", "critic_hidden", "actor_view",
                  "actor_head"):
        mine = getattr(spec, field)
        theirs = source_spec.get(field, {"actor_view": "full", "actor_head": "mlp"}.get(field))
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if mine != theirs:
            raise CheckpointError(f"{source_name}: cannot warm-start: {field} {theirs} != {mine}")
    source_cond = {
        "latent": source_spec["latent_dim"],
        "oracle": source_spec["oracle_dim"],
        "none": 0,
    }[source_spec["conditioning"]]
    if source_cond != 0:
        raise CheckpointError(
            f"{source_name}: warm-start source must be unconditioned "
            f"(got conditioning {source_spec['conditioning']!r})"
        )
    own = agent.state_dict()
    copied = []
    parameter_net = getattr(agent.actor, "parameter_net", None)
    last_parameter_bias = (f"actor.parameter_net.{len(parameter_net) - 1}.bias"
                           if parameter_net is not None else None)
    first_layers = ("actor", "critic", "critic_target")
    with torch.no_grad():
        for name, value in own.items():
            if name.startswith("encoder."):
                continue
            if name.startswith("actor.parameter_net.") and name not in source_state:
                # a model-structured actor (learning.model_actor): the unconditioned source
                # holds one parameter estimate for every task; the conditioned network starts
                # there (its zero-initialized last layer outputs its bias)
                if name == last_parameter_bias and "actor.parameter_bias" in source_state:
                    own[name] = source_state["actor.parameter_bias"].clone()
                    copied.append(name)
                continue
            if name not in source_state:
                raise CheckpointError(f"{source_name}: cannot warm-start: no {name!r}")
            theirs = source_state[name]
            if theirs.shape == value.shape:
                own[name] = theirs.clone()
            else:
                network = name.split(".")[0]
                tail = 0 if network == "actor" else spec.act_dim
                if network not in first_layers or not name.endswith("weight"):
                    raise CheckpointError(
                        f"{source_name}: cannot warm-start {name}: shape "
                        f"{tuple(theirs.shape)} vs {tuple(value.shape)}"
                    )
                keep = network != "actor" and critic_condition == "random"
                own[name] = _expand_inputs(theirs, value, spec.obs_dim, tail, keep)
            copied.append(name)
    agent.load_state_dict(own)
    return copied
