"""Settings of the MAML dynamics models: the one place their defaults live.

:class:`MAMLConfig` is what a model file stores (``metadata["maml_config"]``) and what the
online adapter runs with; :class:`DynamicsConfig`, the ``dynamics`` section of a training
config, is the same settings plus how the models are built and meta-trained.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, StrictBool, StrictInt

from metarl_ros.core.schema import StrictModel

FinitePositive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
FiniteNonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=1)]
"""An int >= 1 that is no bool (nor a string of digits)."""


class MAMLConfig(StrictModel):
    """The dynamics model's width, its MAML inner loop (the same in meta-training and
    online) and the online adapter's safety and correction settings
    (:mod:`metarl_ros.learning.online_adapter`)."""

    hidden_sizes: tuple[Count, ...] = Field(
        default=(64, 64),
        description="hidden layer widths (the MLP's, or the torque_gain model's trunk); () "
        "gives a single affine layer",
    )
    inner_steps: Count = Field(
        default=2, description="SGD steps of the inner loop, meta-training and online alike"
    )
    inner_lr: FinitePositive = Field(default=0.05, description="step size of the inner SGD")
    first_order: StrictBool = Field(
        default=False, description="meta-train with FOMAML (inner gradients detached)"
    )
    max_step_norm: FinitePositive | None = Field(
        default=1.0, description="bound on the global L2 norm of each inner update (null: none)"
    )
    holdout_fraction: float = Field(
        default=0.25,
        gt=0.0,
        lt=1.0,
        description="online: share of a window (its most recent rows) held out to validate "
        "the adapted weights",
    )
    rollback_tolerance: FiniteNonNegative = Field(
        default=0.01,
        description="online: the candidate is accepted iff its held-out loss <= the loss of "
        "the weights in use * (1 + this)",
    )
    correction_steps: Annotated[StrictInt, Field(ge=0)] = Field(
        default=10, description="projected-gradient steps of the MLP's action correction (0: off)"
    )
    correction_lr: FinitePositive = Field(
        default=0.5, description="step size of those steps, in action units"
    )
    trust_weight: FiniteNonNegative = Field(
        default=0.1, description="weight of ||a - a_pi||^2 in the correction objective"
    )
    adapt_from: Literal["meta_init", "current"] = Field(
        default="meta_init",
        description="online: adapt from the meta-learned init (GrBAL) or from the weights in use",
    )
    min_window: StrictInt = Field(
        default=8, ge=2, description="online: shorter windows are skipped or rejected"
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists, numbers, strings) -- safe for ``weights_only`` loading."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MAMLConfig:
        """Inverse of :meth:`to_dict`; unknown keys and bad values raise ``ValueError``
        naming the field."""
        return cls.model_validate(data)


class DynamicsConfig(MAMLConfig):
    """The ``dynamics`` section of a training config: the MAML-trained dynamics models the
    online adapter uses (method pearl only), their :class:`MAMLConfig` and their
    meta-training."""

    enabled: bool = True
    model: Literal["mlp", "torque_gain"] = Field(
        default="torque_gain",
        description="torque_gain: drift(obs, z) + exp(g) b(obs, z) u + beta with only the "
        "per-joint head (g, beta) adapted (learning/torque_model.py); mlp: f(obs, action, z), "
        "every weight adapted, whose action correction made tracking worse (docs/LEARNING.md)",
    )
    head_init_step: PositiveFloat = Field(
        default=6.0, description="torque_gain: initial per-joint step-size multiplier of the head"
    )
    target_blocks: PositiveInt = Field(
        default=2,
        description="mlp: predict the change of the first k observation blocks "
        "(block 0: joint positions, block 1: joint velocities)",
    )
    meta_lr: PositiveFloat = 1e-3
    meta_steps_per_iteration: NonNegativeInt = 10
    tasks_per_meta_step: PositiveInt = 8
    support_size: PositiveInt = 40
    query_size: PositiveInt = 20

    def maml_config(self) -> MAMLConfig:
        """The settings a model file stores and the online adapter runs with."""
        return MAMLConfig(**{name: getattr(self, name) for name in MAMLConfig.model_fields})
