"""A trained model file turned back into networks: the agent and its MAML dynamics models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from metarl_ros.control.policy_interface import PolicyContract
from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.checkpoint import CheckpointError, load_model_payload, load_state_strict
from metarl_ros.learning.dynamics_config import MAMLConfig
from metarl_ros.learning.dynamics_models import AnyDynamics, build_dynamics


@dataclass
class LoadedModel:
    """A model file turned back into networks."""

    agent: ConditionedSAC
    payload: dict
    dynamics: dict[str, AnyDynamics]
    maml_config: MAMLConfig | None
    path: Path

    @property
    def method(self) -> str:
        return self.payload["metadata"].get("method", "unknown")

    @property
    def contract(self) -> PolicyContract:
        c = self.payload["contract"]
        return PolicyContract.from_dict(c)


def load_model(path: str | Path) -> LoadedModel:
    """Load ``model.pt`` (or a directory holding one); errors name the file and the problem."""
    path = Path(path)
    payload = load_model_payload(path)
    source = path / "model.pt" if path.is_dir() else path
    try:
        spec = AgentSpec.from_dict(payload["agent_spec"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: agent spec does not match this version: {exc}") from None
    # the actor's view is a buffer of the state dict: a placeholder until it is loaded
    view = torch.zeros(spec.obs_dim, spec.obs_dim) if spec.actor_view == "reference" else None
    agent = ConditionedSAC(spec, view)
    load_state_strict(agent, payload["agent"], "agent", source)
    agent.eval()
    dynamics: dict[str, AnyDynamics] = {}
    specs = payload["metadata"].get("dynamics_specs", {})
    for name, state in payload.get("extra", {}).items():
        if name not in specs:
            raise CheckpointError(f"{source}: dynamics model {name!r} has no spec")
        model = build_dynamics(specs[name])
        load_state_strict(model, state, name, source)
        dynamics[name] = model
    maml_cfg = payload["metadata"].get("maml_config") or None
    return LoadedModel(
        agent=agent,
        payload=payload,
        dynamics=dynamics,
        maml_config=MAMLConfig.from_dict(maml_cfg) if maml_cfg else None,
        path=source,
    )
