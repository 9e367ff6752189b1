"""Warm-start a conditioned agent from one trained without (or with another) condition.

Curriculum used for the shipped models: first learn precise tracking of the intact robot
(``nominal``), then meta-train on the fault distribution starting from it. The actor's and
critics' first layers gain input columns for the condition (PEARL's ``z`` or the oracle's task
vector); those start at zero, so the warm-started agent *is* the source policy until training
teaches it to use the condition. The encoder and its heads (if any) start fresh.

Input layouts (see :mod:`metarl_ros.learning.agent`): actor ``[obs, cond]``, critic
``[obs, cond, action]``.
"""

from __future__ import annotations

import torch

from metarl_ros.learning.agent import ConditionedSAC
from metarl_ros.learning.checkpoint import CheckpointError


def _expand_inputs(
    source: torch.Tensor, target: torch.Tensor, obs_dim: int, tail: int
) -> torch.Tensor:
    """Copy ``source``'s input slices ``[obs | tail]`` into ``target``, zeros for the condition
    in between. The input axis is dim 1 both for nn.Linear weights (out, in) and for
    EnsembleLinear weights (E, in, out)."""
    out = torch.zeros_like(target)
    out[:, :obs_dim] = source[:, :obs_dim]
    if tail:
        out[:, -tail:] = source[:, -tail:]
    return out


def warm_start(
    agent: ConditionedSAC,
    source_state: dict[str, torch.Tensor],
    source_spec: dict,
    source_name: str,
) -> list[str]:
    """Load ``source_state`` into ``agent`` (actor, critics, temperature); returns what was
    copied. Raises :class:`CheckpointError` if the networks do not correspond."""
    spec = agent.spec
    for field in ("obs_dim", "act_dim", "actor_hidden", "critic_hidden"):
        mine, theirs = getattr(spec, field), source_spec[field]
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
    first_layers = ("actor", "critic", "critic_target")
    with torch.no_grad():
        for name, value in own.items():
            if name.startswith(("encoder.", "decoder.", "task_head.")):
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
                own[name] = _expand_inputs(theirs, value, spec.obs_dim, tail)
            copied.append(name)
    agent.load_state_dict(own)
    return copied
