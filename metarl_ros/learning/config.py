"""Training configuration (``config/train_*.yaml``), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from metarl_ros.core.schema import StrictModel, load_yaml_model
from metarl_ros.learning.agent import AgentSpec

Method = Literal["pearl", "oracle", "robust", "nominal"]
_CONDITIONING = {"pearl": "latent", "oracle": "oracle", "robust": "none", "nominal": "none"}


class AgentConfig(StrictModel):
    """Network sizes and SAC / PEARL hyper-parameters."""

    latent_dim: PositiveInt = 8
    encoder_hidden: list[PositiveInt] = [128, 128]
    encoder_input: Literal["raw", "normalized_delta"] = Field(
        default="raw",
        description="raw: the encoder sees (s, a, r, s') as it is (PEARL); normalized_delta: "
        "(s, a, r, s' - s), standardized by statistics of the initial episodes "
        "(learning/encoder.py)",
    )
    actor_hidden: list[PositiveInt] = [128, 128]
    critic_hidden: list[PositiveInt] = [256, 256]
    gamma: float = Field(default=0.99, gt=0.0, lt=1.0)
    tau: float = Field(default=0.005, gt=0.0, le=1.0)
    actor_lr: PositiveFloat = 3e-4
    critic_lr: PositiveFloat = 3e-4
    encoder_lr: PositiveFloat = 3e-4
    alpha_lr: PositiveFloat = 3e-4
    init_alpha: PositiveFloat = 0.1
    kl_weight: float = Field(default=0.1, ge=0.0)
    reconstruction_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="pearl: weight of a decoder's prediction of each transition's "
        "standardized change of state from (s, a, z), trained with the encoder "
        "(needs encoder_input: normalized_delta; learning/agent.py)",
    )
    decoder_hidden: list[PositiveInt] = [128, 128]
    task_inference_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="pearl: weight of a linear head's regression of the true task vector from "
        "the posterior mean, trained with the encoder (the simulator's task parameters in "
        "training only; needs context_sampling: trailing; learning/agent.py)",
    )


class DynamicsConfig(StrictModel):
    """The MAML-trained dynamics model used by the online adapter (see learning/maml.py)."""

    enabled: bool = True
    model: Literal["mlp", "torque_gain"] = Field(
        default="mlp",
        description="mlp: f(obs, action, z), every weight adapted; torque_gain: "
        "drift(obs, z) + exp(g) b(obs, z) u + beta with only the per-joint head (g, beta) "
        "adapted (learning/torque_model.py)",
    )
    head_init_step: PositiveFloat = Field(
        default=1.0, description="torque_gain: initial per-joint step-size multiplier of the head"
    )
    hidden_sizes: list[PositiveInt] = [128, 128]
    target_blocks: PositiveInt = Field(
        default=2,
        description="predict the change of the first k observation blocks "
        "(block 0: joint positions, block 1: joint velocities)",
    )
    inner_steps: PositiveInt = 2
    inner_lr: PositiveFloat = 0.05
    first_order: bool = False
    max_step_norm: PositiveFloat = 1.0
    meta_lr: PositiveFloat = 1e-3
    meta_steps_per_iteration: NonNegativeInt = 20
    tasks_per_meta_step: PositiveInt = 8
    support_size: PositiveInt = 40
    query_size: PositiveInt = 20


class TrainConfig(StrictModel):
    """Everything ``metarl train`` needs. Paths are relative to the config file or the
    package share directory."""

    method: Method
    env: str = "sim/envs/iiwa7_tracking.yaml"
    seed: NonNegativeInt = 0
    total_iterations: PositiveInt = 200
    envs_per_iteration: PositiveInt = Field(
        default=8,
        description="episodes collected per iteration, one per sampled task, in lockstep",
    )
    initial_episodes_per_task: NonNegativeInt = 1
    updates_per_iteration: PositiveInt = 400
    meta_batch_tasks: PositiveInt = 16
    batch_size: PositiveInt = 128
    context_window: PositiveInt = Field(default=25, description="transitions, streaming posterior")
    min_context: PositiveInt = Field(
        default=1, description="context_sampling task: smallest random fill of the window"
    )
    context_sampling: Literal["task", "trailing"] = Field(
        default="task",
        description="pearl: 'task' conditions a task's whole meta-batch row on one posterior "
        "over a window of consecutive transitions of that task (Rakelly et al., 2019); "
        "'trailing' conditions every RL transition on the posterior over the context_window "
        "transitions before it in its own episode, exactly as deployed (the prior at a reset, "
        "windows that straddle a mid-episode fault), and its next state on the window that "
        "includes it (learning/encoder.py: TrailingContexts)",
    )
    context_segments: PositiveInt = Field(
        default=8,
        description="context_sampling trailing: each task's batch_size RL transitions come as "
        "this many runs of consecutive steps (batch_size must divide by it), whose windows "
        "share their encoded factors",
    )
    fault_episode_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="share of collected training episodes that start on the intact robot and "
        "switch to their task at a time drawn from the suite's fault_time_s, as every "
        "evaluation episode does; the whole episode goes to that task's buffer (pearl needs "
        "context_sampling trailing for it; the oracle's transitions keep the task vector they "
        "were acted on)",
    )
    replay_capacity_per_task: PositiveInt = 20000
    eval_every_iterations: PositiveInt = 10
    eval_tasks: PositiveInt = 8
    checkpoint_every_minutes: PositiveFloat = 5.0
    torch_threads: PositiveInt = 2
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
    intact_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="share of collected episodes and of meta-batch task slots given to the "
        "intact robot (the train split's nominal task); every evaluation and deployment "
        "episode starts intact, and with 1 of 60 tasks its precision is lost in fine-tuning",
    )
    critic_warmup_updates: NonNegativeInt = Field(
        default=0,
        description="first updates that train only the critics (and encoder), actor and "
        "temperature frozen: after init_from the copied critic is right only for the source "
        "task, and actor steps on it would wreck the copied policy",
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
        default=0.0,
        ge=0.0,
        description="temporal action smoothness (CAPS): adds smoothness_weight * "
        "||a(s, c) - a(s', c)||^2 over consecutive states (deterministic actions) to the actor "
        "loss, against actions that flip sign from one control step to the next (shaking on "
        "hardware)",
    )
    agent: AgentConfig = AgentConfig()
    dynamics: DynamicsConfig = DynamicsConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_context > self.context_window:
            raise ValueError("min_context must not exceed context_window")
        if self.anchor_weight > 0 and not self.init_from:
            raise ValueError("anchor_weight > 0 needs init_from (the policy to stay near)")
        if self.init_critic_condition != "zero" and not self.init_from:
            raise ValueError("init_critic_condition 'random' needs init_from (without it every "
                             "column starts random anyway)")
        if self.agent.task_inference_weight > 0 and (
            self.method != "pearl" or self.context_sampling != "trailing"
        ):
            raise ValueError(
                "agent.task_inference_weight > 0 is for method pearl with context_sampling "
                "trailing (each RL transition's own task vector is the target)"
            )
        if self.context_sampling == "trailing":
            if self.method != "pearl":
                raise ValueError("context_sampling trailing is for method pearl (a context)")
            if self.batch_size % self.context_segments:
                raise ValueError(
                    f"batch_size {self.batch_size} must divide by context_segments "
                    f"{self.context_segments}"
                )
        if self.fault_episode_fraction > 0:
            if self.method == "nominal":
                raise ValueError(
                    "fault_episode_fraction > 0 does not apply to method nominal: it trains on "
                    "the intact robot only"
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
            encoder_input=a.encoder_input,
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
            reconstruction_weight=a.reconstruction_weight,
            decoder_hidden=tuple(a.decoder_hidden),
            task_inference_weight=a.task_inference_weight,
        )


def load_train_config(path: str | Path) -> TrainConfig:
    return load_yaml_model(TrainConfig, path)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(stored: dict, current: TrainConfig) -> list[str]:
    """What differs between a run's stored config and ``current``, one ``"field: old -> new"``
    per dotted field; empty if they describe the same run.

    ``stored`` is a dumped :class:`TrainConfig`, possibly written before fields were added:
    it is read through the current schema, so a field added since at its default is no
    change (a run started before an option existed resumes under the option's default,
    which is what it trained with). A stored config the schema no longer accepts is one
    change that says why.
    """
    try:
        before = TrainConfig.model_validate(stored).model_dump(mode="json")
    except ValueError as error:
        return [f"stored config no longer valid: {error}"]
    old, new = _flatten(before), _flatten(current.model_dump(mode="json"))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
