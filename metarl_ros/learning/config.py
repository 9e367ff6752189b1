"""Training configuration (``config/train_*.yaml``), validated with pydantic.

The defaults are the shipped recipe (``config/train_pearl.yaml``); each recipe file says only
what differs for its method. ``metarl train --set key=value`` and a sweep change fields
through :func:`apply_overrides`, validated by the same schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from metarl_ros.core.schema import (
    ConfigError,
    StrictModel,
    drop_retired,
    read_yaml,
    validate_model,
)
from metarl_ros.learning.agent import RETIRED_SPEC_FIELDS, AgentSpec
from metarl_ros.learning.dynamics_config import DynamicsConfig

Method = Literal["pearl", "oracle", "robust", "nominal"]
_CONDITIONING = {"pearl": "latent", "oracle": "oracle", "robust": "none", "nominal": "none"}


class AgentConfig(StrictModel):
    """Network sizes and SAC / PEARL hyper-parameters."""

    latent_dim: PositiveInt = 8
    encoder_hidden: list[PositiveInt] = [128, 128]
    actor_hidden: list[PositiveInt] = [128, 128]
    critic_hidden: list[PositiveInt] = [128, 128]
    gamma: float = Field(default=0.95, gt=0.0, lt=1.0)
    tau: float = Field(default=0.005, gt=0.0, le=1.0)
    actor_lr: PositiveFloat = 3e-4
    critic_lr: PositiveFloat = 3e-4
    encoder_lr: PositiveFloat = 3e-4
    alpha_lr: PositiveFloat = 3e-4
    init_alpha: PositiveFloat = 0.1
    kl_weight: float = Field(
        default=0.001,
        ge=0.0,
        description="pearl: weight of KL(q(z|c) || N(0, I)) in the encoder's loss; 0.001, not "
        "PEARL's 0.1: at 0.1 the KL term is as large as the critic loss and 7 of the 8 latent "
        "dimensions collapse to the prior, at 0.001 all 8 carry the task (docs/LEARNING.md)",
    )
    actor_view: Literal["full", "reference"] = Field(
        default="reference",
        description="reference: the actor sees the observation on the reference (q = q_ref, "
        "qd = qd_ref): a pure feed-forward policy that cannot stiffen the PD loop, so faults "
        "are compensated through adaptation, not stiffness (docs/ENVIRONMENT.md)",
    )
    actor_head: Literal["mlp", "model"] = Field(
        default="model",
        description="model: the actor's condition (PEARL's z, the oracle's task) is mapped to "
        "the fault's physical parameters (motor strength, payload inertial parameters, "
        "friction), fed forward through the nominal rigid-body model's torques along the "
        "reference, plus an MLP residual (learning.model_actor); needs an env with "
        "observation.model_features: true. mlp: an MLP of the observation and condition",
    )


class TrainConfig(StrictModel):
    """Everything ``metarl train`` needs. Paths are relative to the config file or the
    package share directory."""

    method: Method
    env: str = "sim/envs/iiwa7_compliant.yaml"
    seed: NonNegativeInt = 1
    total_iterations: PositiveInt = Field(
        default=200, description="at 100, PEARL and the oracle were still improving"
    )
    envs_per_iteration: PositiveInt = Field(
        default=8,
        description="episodes collected per iteration, one per sampled task, in lockstep",
    )
    initial_episodes_per_task: NonNegativeInt = 1
    updates_per_iteration: PositiveInt = 300
    meta_batch_tasks: PositiveInt = 8
    batch_size: PositiveInt = 128
    context_window: PositiveInt = Field(default=25, description="transitions, streaming posterior")
    min_context: PositiveInt = Field(
        default=1, description="context_sampling task: smallest random fill of the window"
    )
    context_sampling: Literal["task", "trailing"] = Field(
        default="trailing",
        description="pearl (the other methods have no context): 'trailing' conditions every "
        "RL transition on the posterior over the context_window transitions before it in its "
        "own episode, exactly as deployed (the prior at a reset, windows that straddle a "
        "mid-episode fault), and its next state on the window that includes it "
        "(learning/encoder.py: TrailingContexts); 'task' conditions a task's whole meta-batch "
        "row on one posterior over a window of consecutive transitions of that task "
        "(Rakelly et al., 2019)",
    )
    context_segments: PositiveInt = Field(
        default=8,
        description="context_sampling trailing: each task's batch_size RL transitions come as "
        "this many runs of consecutive steps (batch_size must divide by it), whose windows "
        "share their encoded factors",
    )
    fault_episode_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="share of collected training episodes that start on the intact robot and "
        "switch to their task at a time drawn from the suite's fault_time_s, as every "
        "evaluation episode does; the whole episode goes to that task's buffer (pearl needs "
        "context_sampling trailing for it; the oracle's transitions keep the task vector they "
        "were acted on; nominal, which trains on the intact robot only, needs 0)",
    )
    replay_capacity_per_task: PositiveInt = Field(
        default=2000,
        description="transitions per training task: 240 tasks get about two 400-step episodes "
        "each in a run (initial_episodes_per_task + 8 per iteration)",
    )
    eval_every_iterations: PositiveInt = 10
    eval_tasks: PositiveInt = 8
    checkpoint_every_minutes: PositiveFloat = 5.0
    torch_threads: PositiveInt = 1
    save_replay: bool = Field(default=True, description="store replay buffers for exact resume")
    init_from: str | None = Field(
        default=None,
        description="model.pt of an unconditioned run (e.g. nominal) to start actor, critics "
        "and temperature from; the actor's condition inputs start at zero, the critics' as "
        "init_critic_condition says (learning/warm_start.py)",
    )
    init_critic_condition: Literal["zero", "random"] = Field(
        default="zero",
        description="with init_from: how the critics' new condition columns start. 'zero' "
        "makes the start exactly the source agent; 'random' keeps their fresh initialization "
        "(the actor's stay zero, so the start policy is still the source), which gives PEARL's "
        "encoder a Bellman gradient from the first update (learning/warm_start.py)",
    )
    anchor_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="trust region to the init_from policy: adds anchor_weight * "
        "||a(s, c) - a_init(s)||^2 (deterministic actions) to the actor loss, so that the "
        "fine-tune moves the actor only where the critic's action gradient outweighs the pull "
        "and keeps the source's precision elsewhere; needs init_from",
    )
    smoothness_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="temporal action smoothness (CAPS): adds smoothness_weight * "
        "||a(s, c) - a(s', c)||^2 over consecutive states (deterministic actions) to the actor "
        "loss, against actions that flip sign from one control step to the next (shaking on "
        "hardware)",
    )
    teacher_weight: float = Field(
        default=1000.0,
        ge=0.0,
        description="privileged teacher (sim/teacher.py): adds teacher_weight * ||a(s, c) - "
        "a_teacher||^2 (deterministic actions) to the actor loss, a_teacher being the true "
        "model's feed-forward on the reference as a residual action; for pearl the same term "
        "trains the encoder (through z) besides the Bellman error. Made for agent.actor_view "
        "reference, whose actor is feed-forward only (docs/LEARNING.md)",
    )
    parameter_weight: float = Field(
        default=10.0,
        ge=0.0,
        description="agent.actor_head model: adds parameter_weight * ||(theta(c) - "
        "theta_true) / scale||^2 to the actor loss (and, for pearl, through z to the "
        "encoder's): the actor's estimate of the fault's physical parameters is regressed on "
        "the true ones, as RMA regresses its extrinsics. The label alone leaves them "
        "ambiguous (a weak shoulder and a payload both scale the shoulder's torque): an oracle "
        "trained on the label only put a 2 kg payload at 0.44 kg and weakened every motor "
        "(docs/LEARNING.md). 0 with actor_head mlp",
    )
    agent: AgentConfig = AgentConfig()
    dynamics: DynamicsConfig = DynamicsConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_context > self.context_window:
            raise ValueError("min_context must not exceed context_window")
        if self.anchor_weight > 0 and not self.init_from:
            raise ValueError("anchor_weight > 0 needs init_from (the policy to stay near)")
        if self.parameter_weight > 0 and self.agent.actor_head != "model":
            raise ValueError("parameter_weight > 0 needs agent.actor_head: model (set "
                             "parameter_weight: 0 for the mlp actor)")
        if self.init_critic_condition != "zero" and not self.init_from:
            raise ValueError("init_critic_condition 'random' needs init_from (without it every "
                             "column starts random anyway)")
        if self.context_sampling == "trailing" and self.batch_size % self.context_segments:
            raise ValueError(
                f"batch_size {self.batch_size} must divide by context_segments "
                f"{self.context_segments}"
            )
        if self.fault_episode_fraction > 0:
            if self.method == "nominal":
                raise ValueError(
                    "fault_episode_fraction > 0 does not apply to method nominal: it trains on "
                    "the intact robot only (set fault_episode_fraction: 0.0)"
                )
            if self.method == "pearl" and self.context_sampling != "trailing":
                raise ValueError(
                    "fault_episode_fraction > 0 needs context_sampling trailing for pearl: a "
                    "per-task context would mix the intact and the faulty part of an episode"
                )
        return self

    @property
    def conditioning(self) -> str:
        return _CONDITIONING[self.method]

    def agent_spec(self, obs_dim: int, act_dim: int, oracle_dim: int) -> AgentSpec:
        a = self.agent
        return AgentSpec(
            obs_dim=obs_dim,
            act_dim=act_dim,
            conditioning=self.conditioning,  # type: ignore[arg-type]
            latent_dim=a.latent_dim,
            oracle_dim=oracle_dim,
            encoder_hidden=tuple(a.encoder_hidden),
            actor_hidden=tuple(a.actor_hidden),
            critic_hidden=tuple(a.critic_hidden),
            gamma=a.gamma,
            tau=a.tau,
            actor_lr=a.actor_lr,
            critic_lr=a.critic_lr,
            encoder_lr=a.encoder_lr,
            alpha_lr=a.alpha_lr,
            init_alpha=a.init_alpha,
            kl_weight=a.kl_weight,
            actor_view=a.actor_view,  # type: ignore[arg-type]
            actor_head=a.actor_head,  # type: ignore[arg-type]
        )


# ------------------------------------------------------------------------------------------
# overrides: metarl train --seed / --set, sweeps
# ------------------------------------------------------------------------------------------


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the config mapping ``config`` with each ``"dotted.key=value"`` of
    ``overrides`` set, in order (``agent.kl_weight=0.001``, ``agent.actor_hidden=[64, 64]``).
    Values are parsed as YAML (numbers, booleans, ``null``, strings, ``[lists]``); the result
    is not validated: do that with the schema (:func:`load_train_config` does), whose errors
    name the key. Raises ``ValueError`` naming the item for one that is no ``key=value`` or
    whose key goes through a value that is no mapping."""
    result: dict[str, Any] = dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: value is not YAML: {error}") from None
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part, {})
            if not isinstance(child, Mapping):
                raise ValueError(
                    f"override {item!r}: {'.'.join(path[: depth + 1])} is {child!r}, not a "
                    "section with keys"
                )
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return result


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config in ``path`` with ``overrides`` (:func:`apply_overrides`) applied;
    :class:`~metarl_ros.core.schema.ConfigError` names the file, the overrides and the field."""
    data = read_yaml(path)
    if not overrides:
        return validate_model(TrainConfig, data, str(path))
    source = f"{path} with --set {' '.join(overrides)}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: not a mapping of settings")
    try:
        data = apply_overrides(data, overrides)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    return validate_model(TrainConfig, data, source)


def run_config_text(path: str | Path, overrides: Sequence[str] = ()) -> str:
    """What a run directory keeps as its ``config.yaml``: the file as it is, or with
    ``overrides`` the settings they give, under a comment that names them."""
    text = Path(path).read_text()
    if not overrides:
        return text
    data = apply_overrides(yaml.safe_load(text), overrides)
    header = f"# {path} with --set {' '.join(overrides)}\n"
    return header + yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------
# resume: is a stored config the same run?
# ------------------------------------------------------------------------------------------

RETIRED_FIELDS: dict[str, Any] = {
    "intact_fraction": 0.0,
    "critic_warmup_updates": 0,
    **{f"agent.{name}": value for name, value in RETIRED_SPEC_FIELDS.items()},
}
"""Options removed after runs were stored with them, at the value that made them do nothing."""

BEFORE_THEY_EXISTED: dict[str, Any] = {
    "context_sampling": "task",
    "fault_episode_fraction": 0.0,
    "smoothness_weight": 0.0,
    "dynamics.model": "mlp",
    "dynamics.head_init_step": 1.0,
}
"""Fields added after the first stored configs whose default is no longer what a run did
before the field existed: a stored config without one of them ran with this value."""

PEARL_ONLY = ("context_sampling", "context_segments", "min_context", "agent.latent_dim",
              "agent.encoder_hidden", "agent.encoder_lr", "agent.kl_weight", "dynamics.")
"""Fields (or sections) that change nothing in a run of another method: no context, no
encoder, no dynamics models."""


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_stored_today(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config in today's schema: removed options dropped, fields it predates set to
    what its run did without them."""
    data = drop_retired(stored, RETIRED_FIELDS)
    for dotted, value in BEFORE_THEY_EXISTED.items():
        section, _, leaf = dotted.rpartition(".")
        node = data
        if section:
            data[section] = node = dict(data.get(section, {}))
        node.setdefault(leaf, value)
    return data


def config_changes(stored: dict, current: TrainConfig) -> list[str]:
    """What differs between a run's stored config and ``current``, one ``"field: old -> new"``
    per dotted field; empty if they describe the same run.

    ``stored`` is a dumped :class:`TrainConfig`, possibly written by an older version: it is
    read through the current schema after :func:`_as_stored_today` (a removed option at the
    value that did nothing is no change; a field added since is at the value the run had
    before it existed), and for methods other than pearl the fields of
    :data:`PEARL_ONLY` are not compared. A stored config the schema no longer accepts is one
    change that says why.
    """
    try:
        before = TrainConfig.model_validate(_as_stored_today(stored)).model_dump(mode="json")
    except ValueError as error:
        return [f"stored config no longer valid: {error}"]
    old, new = _flatten(before), _flatten(current.model_dump(mode="json"))
    ignored = PEARL_ONLY if before["method"] != "pearl" and current.method != "pearl" else ()
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(ignored)
    ]
