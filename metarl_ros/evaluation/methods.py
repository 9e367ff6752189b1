"""What ``metarl eval`` can evaluate: the registry of methods and the trained runs behind them.

A method is either

* a **learned** model (:class:`LearnedMethod`): a policy from a training run's
  ``<model>/model.pt``, run batched through :class:`~metarl_ros.learning.rollout.VectorRollout`,
  optionally with the MAML dynamics correction (whose models the PEARL run trains); or
* any **policy** (:class:`PolicyMethod`): a factory ``f(setup=EnvSetup, **kwargs) ->
  AdaptivePolicy`` (:mod:`metarl_ros.control.policy_interface`), named ``"module:function"``
  so that worker processes import it themselves. A **privileged** policy is told the true
  task: its ``set_task(task)`` is called at every reset (the intact task) and right after the
  control step in which the fault struck (the faulted task), as the oracle sees its task
  vector. Policies need no trained model and run once, whatever the number of training runs.

:data:`METHODS` is the registry (``register`` adds to it); :data:`DEFAULT_METHODS` are those
``metarl eval`` runs without ``--methods``. ``nominal`` (the log-error baseline of the
gap-closed score) and ``ceiling`` (the physical ceiling), when registered, are always run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metarl_ros.core.schema import ConfigError
from metarl_ros.evaluation.metrics import CEILING, NOMINAL
from metarl_ros.learning.checkpoint import CheckpointError
from metarl_ros.policy.parameter_adaptation import ParameterAdaptationConfig


@dataclass(frozen=True)
class LearnedMethod:
    name: str
    model: str
    """the training run the policy comes from: ``<root>/<model>/model.pt``."""
    maml: bool = False
    """add the MAML dynamics correction (dynamics models from the run's ``pearl`` model; the
    latent-conditioned one when the policy is PEARL's)."""
    maml_options: tuple[tuple[str, object], ...] = ()
    """keyword arguments of the MAML correction
    (:class:`~metarl_ros.policy.dynamics_adaptation.DynamicsAdaptation`: its gates and bound);
    empty = its defaults."""
    parameter_adaptation: ParameterAdaptationConfig | None = None
    """refine the policy's feed-forward online on the model features with these gains
    (:mod:`metarl_ros.policy.parameter_adaptation`)."""
    latent_lag: int = 0
    """the posterior each action uses leaves out the newest ``latent_lag`` transitions: 1 is
    what a node acting ahead of the joint state runs (``LoopConfig.act_ahead``)."""
    default: bool = True
    description: str = ""

    def models(self) -> tuple[str, ...]:
        """The trained models this method needs."""
        return (self.model, "pearl") if self.maml and self.model != "pearl" else (self.model,)


@dataclass(frozen=True)
class PolicyMethod:
    name: str
    factory: str | Callable
    """``"package.module:function"`` (or a picklable callable) returning an AdaptivePolicy
    for ``factory(setup=EnvSetup, **kwargs)``."""
    kwargs: tuple[tuple[str, object], ...] = ()
    privileged: bool = False
    """told the true task through ``set_task(task)`` at reset and at the fault."""
    default: bool = True
    description: str = ""

    def models(self) -> tuple[str, ...]:
        return ()

    def build(self, setup):
        """A fresh policy for ``setup``."""
        factory = self.factory
        if isinstance(factory, str):
            module, _, attribute = factory.partition(":")
            factory = getattr(importlib.import_module(module), attribute)
        policy = factory(setup=setup, **dict(self.kwargs))
        if self.privileged and not callable(getattr(policy, "set_task", None)):
            raise ConfigError(f"method {self.name!r} is privileged but its policy has no "
                              "set_task(task)")
        return policy


MethodSpec = LearnedMethod | PolicyMethod

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        LearnedMethod("oracle", "oracle", description="SAC given the true task vector"),
        LearnedMethod("robust", "robust", description="SAC without context, fault-trained"),
        LearnedMethod(NOMINAL, "nominal", description="SAC trained on the intact robot"),
        LearnedMethod("pearl", "pearl", description="PEARL, streaming posterior mean"),
        LearnedMethod("maml", "robust", maml=True, description="robust + MAML correction"),
        LearnedMethod("pearl_maml", "pearl", maml=True, description="PEARL + MAML correction"),
        LearnedMethod("pearl_ahead", "pearl", latent_lag=1, default=False,
                      description="PEARL acting one tick behind the newest transition, as a "
                                  "node with act_ahead"),
        LearnedMethod("pearl_maml_ahead", "pearl", maml=True, latent_lag=1, default=False,
                      description="PEARL + MAML correction, the actor one tick behind the "
                                  "newest transition, as adapter_node with act_ahead"),
        LearnedMethod("pearl_adapt", "pearl", parameter_adaptation=ParameterAdaptationConfig(),
                      description="PEARL + online refinement of its fault parameters"),
        PolicyMethod("pd", "metarl_ros.policy.factory:make_policy", (("kind", "pd"),),
                     default=False, description="the env's own controller with a zero action: "
                     "its PD, plus the nominal arm's feed-forward where the env has one"),
        PolicyMethod("adaptive_ff",
                     "metarl_ros.policy.factory:adaptive_feed_forward_policy",
                     description="the env's controller + online adaptation of the fault "
                     "parameters on the model features (desired-compensation law)"),
        PolicyMethod(CEILING, "metarl_ros.policy.computed_torque:computed_torque_policy",
                     privileged=True, description="computed torque with the true faulted model "
                     "at the PD's compliance: the physical ceiling (privileged)"),
        PolicyMethod("dob", "metarl_ros.policy.momentum_observer:momentum_observer_policy",
                     description="momentum observer (De Luca) feed-forward on computed torque"),
        PolicyMethod("adaptive_ct",
                     "metarl_ros.policy.adaptive_computed_torque:slotine_li_policy",
                     description="adaptive computed torque (Slotine-Li): payload and motors"),
    )
}
ALWAYS_RUN = (NOMINAL, CEILING)
"""Run whenever registered: the references of the gap-closed score and of recovery."""


def register(spec: MethodSpec) -> None:
    """Add (or replace) a method in :data:`METHODS`."""
    METHODS[spec.name] = spec


def default_methods() -> list[str]:
    return [name for name, spec in METHODS.items() if spec.default]


def resolve_methods(names: Sequence[str] | None) -> list[str]:
    """The methods to run, in registry order: ``names`` (or the defaults) plus those of
    :data:`ALWAYS_RUN` that are registered."""
    wanted = list(names) if names else default_methods()
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise CheckpointError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    wanted += [m for m in ALWAYS_RUN if m in METHODS]
    return [m for m in METHODS if m in wanted]


@dataclass(frozen=True)
class ModelRun:
    """One training run of the learned methods: ``models[name]`` is a model.pt path."""

    index: int
    path: Path
    models: dict[str, Path] = field(default_factory=dict)

    def provides(self, spec: MethodSpec) -> bool:
        return all(name in self.models for name in spec.models())


def find_model_runs(paths: Sequence[str | Path]) -> list[ModelRun]:
    """Each ``--model`` argument as a training run: a directory with ``<name>/model.pt``
    folders, or one model (``model.pt`` or its folder) filed under the method stored in it."""
    runs = []
    for index, raw in enumerate(paths):
        path = Path(raw)
        single = path if path.is_file() else path / "model.pt"
        if single.is_file():
            from metarl_ros.learning.checkpoint import load_model_payload

            method = load_model_payload(single)["metadata"].get("method", "unknown")
            runs.append(ModelRun(index, path, {method: single}))
        elif path.is_dir():
            found = {p.parent.name: p for p in sorted(path.glob("*/model.pt"))}
            runs.append(ModelRun(index, path, found))
        else:
            raise CheckpointError(f"{path}: no such model directory or file")
    return runs


def check_first_run(run: ModelRun, methods: Sequence[str]) -> None:
    """The first run must hold every model the learned methods need (and ``nominal``)."""
    for name in sorted({NOMINAL} | {m for s in methods for m in METHODS[s].models()}):
        if name not in run.models:
            users = [s for s in methods if name in METHODS[s].models()] or [name]
            raise CheckpointError(
                f"{run.path / name / 'model.pt'}: missing; method(s) {users} need it (nominal "
                "is the baseline of the gap-closed score; the PEARL run's dynamics models are "
                "needed by the MAML methods)"
            )
