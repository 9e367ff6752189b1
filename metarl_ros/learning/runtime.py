"""Load trained models and run them online: the torch implementation of
:class:`metarl_ros.runtime.AdaptivePolicy`.

:class:`TorchAdaptivePolicy` keeps a streaming posterior over the last ``window_size``
transitions (PEARL), acts with the latent-conditioned actor, and -- with adaptation on and a
MAML dynamics model in the file -- runs :class:`~metarl_ros.learning.maml.OnlineAdapter` on the
recent transitions (in a background thread on the robot, inline in evaluation) and corrects the
actor's action with the adapted model.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.func import functional_call

from metarl_ros.learning import maml
from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.checkpoint import CheckpointError, load_model_payload, load_state_strict
from metarl_ros.learning.encoder import StreamingPosterior, make_transition
from metarl_ros.learning.torque_model import PDStructure, TorqueGainDynamics, head_at
from metarl_ros.runtime import PolicyContract, PosteriorSummary

_LOG = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model file turned back into networks."""

    agent: ConditionedSAC
    payload: dict
    dynamics: dict[str, maml.DynamicsModel | TorqueGainDynamics]
    maml_config: maml.MAMLConfig | None
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
        spec = AgentSpec(
            **{
                **payload["agent_spec"],
                **{k: tuple(v) for k, v in payload["agent_spec"].items() if isinstance(v, list)},
            }
        )
    except TypeError as exc:
        raise CheckpointError(f"{source}: agent spec does not match this version: {exc}") from None
    agent = ConditionedSAC(spec)
    load_state_strict(agent, payload["agent"], "agent", source)
    agent.eval()
    dynamics: dict[str, maml.DynamicsModel | TorqueGainDynamics] = {}
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
        maml_config=maml.MAMLConfig.from_dict(maml_cfg) if maml_cfg else None,
        path=source,
    )


AnyDynamics = maml.DynamicsModel | TorqueGainDynamics

MLP_DEFAULTS = {"min_improvement": 0.6, "max_correction": 0.1}
"""Deployment settings of the correction with the plain MLP model (as shipped before)."""
STRUCTURED_DEFAULTS = {"min_improvement": 0.1, "max_correction": 0.5, "lag_band_rad": 0.002}
"""Deployment settings of the correction with :class:`TorqueGainDynamics` (chosen on
evaluation episodes of seed 1, docs/BENCHMARKS.md)."""
LAG_HORIZON_TICKS = 25
"""Time constant, in control ticks, of the per-joint mean tracking error the lag gate reads
(0.25 s at 100 Hz: the context window's span)."""


def per_joint_error(
    model: TorqueGainDynamics, params: Mapping[str, torch.Tensor], batch: maml.TransitionBatch
) -> np.ndarray:
    """Mean squared normalised prediction error of each joint, (n,), at ``params``."""
    pred = functional_call(model, dict(params), (batch.obs, batch.action, batch.latent))
    return (pred - model.normalized_target(batch)).pow(2).mean(0).numpy()


def build_dynamics(spec: Mapping) -> AnyDynamics:
    """A dynamics model from its ``spec()`` (``kind`` absent: the plain MLP)."""
    if spec.get("kind", "mlp") == TorqueGainDynamics.kind:
        return TorqueGainDynamics(
            spec["obs_dim"],
            spec["act_dim"],
            spec["latent_dim"],
            tuple(spec["hidden_sizes"]),
            PDStructure.from_dict(spec["pd"]),
        )
    return maml.DynamicsModel(
        spec["obs_dim"],
        spec["act_dim"],
        spec["target_dim"],
        latent_dim=spec["latent_dim"],
        hidden_sizes=tuple(spec["hidden_sizes"]),
    )


class DynamicsAdaptation:
    """MAML online adaptation + action correction for one stream of transitions.

    The expensive work happens in :meth:`step`, at the adaptation rate (10 Hz): adapt the
    dynamics model on the recent window (:class:`~metarl_ros.learning.maml.OnlineAdapter`:
    from the meta-init, bounded steps, rollback on held-out data), then solve the action
    correction for the newest state the policy acted in and keep it as an offset. The control
    loop only adds the held offset (:meth:`apply`), so a tick costs microseconds; the offset is
    at most one adaptation period old, like the adapted weights themselves.

    What the correction aims for: the *pre-fault* effect of the action. The first weights
    adapted after a reset (the robot starts in its known condition) are kept as the reference
    dynamics; later the correction searches the action whose outcome under the current
    adapted model matches the outcome the policy's action had under the reference. (The
    meta-initialization itself is no reference: MAML makes it a good starting point for
    adaptation, not a good model of any robot.)

    It acts only on evidence -- when the weights in use predict the held-out newest part of
    the window at least ``min_improvement`` better (relative) than the reference, i.e. the
    robot now behaves unlike before -- and it is bounded to ``max_correction`` per action
    dimension.

    Better prediction is not better control: a head fitted to recent data also predicts it
    better when the model's error merely depends on the state, and the policy may already
    compensate what the model sees. So (structured model) the **lag gate** lets joint ``i``'s
    correction act only as far as the joint lags its reference in the direction the
    correction pushes: the correction is scaled by
    ``clip(sign(da_i) * e_i / lag_band_rad, 0, 1)``, with ``e_i`` the joint's mean position
    error ``q_ref - q`` over the last ``LAG_HORIZON_TICKS`` ticks (exponential average). A
    joint that tracks gets no correction; one the correction would push past its reference
    gets none either; one that sags by ``lag_band_rad`` or more gets all of it.

    With the structured model (:class:`~metarl_ros.learning.torque_model.TorqueGainDynamics`)
    the correction is the closed-form inverse of the adapted per-joint torque gain and bias,
    and the evidence is per joint: joint ``i`` is corrected only when the adapted head
    predicts the held-out newest quarter of the window on that joint at least
    ``min_improvement`` better than the reference head, over ``confirmations`` consecutive
    adaptations each of which implies a correction of the same sign at the current state as
    the adaptation before it (a head that flips between windows is noise, not a fault). What is
    held between adaptations is the gain ratio and the bias torque, applied every tick to the
    current commanded torque (``da = (r - 1) u + c``), so the correction follows the PD's fast
    changes.

    Args:
        model: the meta-trained dynamics model (with or without latent input).
        config: inner-loop settings (as meta-trained).
        window: how many recent transitions adaptation uses.
        adapt_every: inline mode: run :meth:`step` after this many new transitions.
        min_improvement: relative held-out improvement over the reference that counts as
            evidence (default: per model kind, ``STRUCTURED_DEFAULTS`` / ``MLP_DEFAULTS``).
        max_correction: bound on the correction per action dimension, action units
            (default: per model kind).
        confirmations: structured model: consecutive adaptations that must agree.
        lag_band_rad: structured model: the joint's mean lag (rad) at which the lag gate
            passes the whole correction; ``None`` turns the gate off (default: per model kind).
    """

    def __init__(
        self,
        model: AnyDynamics,
        config: maml.MAMLConfig,
        window: int = 60,
        adapt_every: int = 10,
        min_improvement: float | None = None,
        max_correction: float | None = None,
        confirmations: int = 2,
        lag_band_rad: float | None | Literal["default"] = "default",
    ) -> None:
        self.adapter = maml.OnlineAdapter(model, config)  # type: ignore[arg-type]
        self.structured = isinstance(model, TorqueGainDynamics)
        self.confirmations = confirmations
        n = model.act_dim
        # structured: (gain ratio r, bias torque c) per joint, one immutable tuple
        self._head_correction = (np.ones(n, np.float32), np.zeros(n, np.float32))
        self._streak = np.zeros(n, np.int64)
        self._previous: Mapping[str, torch.Tensor] | None = None
        if self.structured:
            self._kp_u = model.kp_u.numpy().astype(np.float32)
            self._kd_u = model.kd_u.numpy().astype(np.float32)
            self._position_error_scale = float(model.pd.position_error_scale)
        self._mean_lag = np.zeros(n, np.float32)  # rad, per joint (lag gate)
        # private copy: functional calls swap tensors inside the module (not thread-safe)
        self._model = copy.deepcopy(model)
        self.uses_latent = model.latent_dim > 0
        self.window: deque[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = deque(
            maxlen=window
        )
        self.adapt_every = adapt_every
        defaults = STRUCTURED_DEFAULTS if self.structured else MLP_DEFAULTS
        self.min_improvement = (
            defaults["min_improvement"] if min_improvement is None else min_improvement
        )
        self.max_correction = (
            defaults["max_correction"] if max_correction is None else max_correction
        )
        band = defaults.get("lag_band_rad") if lag_band_rad == "default" else lag_band_rad
        if band is not None and not (np.isfinite(band) and band > 0):
            raise ValueError(f"lag_band_rad must be a positive number or None, got {band!r}")
        self.lag_band_rad = band if self.structured else None
        self.active = False  # is a correction being applied
        self._reference: Mapping[str, torch.Tensor] | None = None
        self._since_step = 0
        self._lock = threading.Lock()
        self._query: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._offset = np.zeros(model.act_dim, np.float32)
        self.last_result: maml.AdaptationResult | None = None
        self.steps = 0
        self.errors = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        with self._lock:
            self.window.clear()
            self._query = None
            self._offset = np.zeros_like(self._offset)
            self._reference = None
            n = self._offset.shape[0]
            self._head_correction = (np.ones(n, np.float32), np.zeros(n, np.float32))
            self._streak = np.zeros(n, np.int64)
            self._previous = None
            self._mean_lag = np.zeros(n, np.float32)
        self.adapter.reset()
        self._since_step = 0

    # ------------------------------------------------------------ control-loop side (cheap)

    def apply(self, obs: np.ndarray, action: np.ndarray, latent: np.ndarray | None) -> np.ndarray:
        """Remember the query for the next :meth:`step`; return the corrected action: the
        held offset, or (structured model) ``(r - 1) u + c`` with the held gain ratio ``r``
        and bias torque ``c`` and the current commanded torque ``u``, through the lag gate."""
        self._query = (obs, action, latent)
        if self.structured:
            ratio, bias = self._head_correction
            n = ratio.shape[0]
            position_error = obs[2 * n : 3 * n]
            if np.isfinite(position_error).all():  # one bad reading must not stick in the mean
                self._mean_lag += (
                    position_error / self._position_error_scale - self._mean_lag
                ) / LAG_HORIZON_TICKS
            u = action + self._kp_u * position_error + self._kd_u * obs[3 * n : 4 * n]
            offset = np.clip((ratio - 1.0) * u + bias, -self.max_correction, self.max_correction)
            if self.lag_band_rad is not None:
                offset = offset * self.lag_gate(offset)
            return np.clip(action + offset, -1.0, 1.0).astype(np.float32)
        return np.clip(action + self._offset, -1.0, 1.0).astype(np.float32)

    def lag_gate(self, offset: np.ndarray) -> np.ndarray:
        """Per-joint factor in [0, 1], (n,): how far each joint lags its reference (mean
        ``q_ref - q``) in the direction ``offset`` (n,) pushes it, in units of
        ``lag_band_rad``."""
        assert self.lag_band_rad is not None
        return np.clip(np.sign(offset) * self._mean_lag / self.lag_band_rad, 0.0, 1.0)

    def record(
        self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, latent: np.ndarray | None
    ) -> None:
        with self._lock:
            self.window.append((obs, action, next_obs, latent))
        self._since_step += 1

    # ------------------------------------------------------------ adaptation side (10 Hz)

    def batch(self) -> maml.TransitionBatch | None:
        """The recent window as a batch (oldest first), or None if it is too short."""
        with self._lock:
            items = list(self.window)
        if len(items) < self.adapter.config.min_window:
            return None
        obs, action, next_obs, latent = zip(*items)
        z = None
        if self.uses_latent:
            # condition every transition on the newest belief (what the policy uses now)
            z = torch.from_numpy(np.repeat(np.asarray(latent[-1])[None], len(items), 0)).float()
        return maml.TransitionBatch(
            torch.from_numpy(np.stack(obs)).float(),
            torch.from_numpy(np.stack(action)).float(),
            torch.from_numpy(np.stack(next_obs)).float(),
            z,
        )

    def step(self) -> None:
        """Adapt on the window, then recompute the held correction for the newest query."""
        window = self.batch()
        if window is not None:
            self.last_result = self.adapter.adapt(window)
            if self._reference is None and self.last_result.accepted:
                self._reference = self.adapter.current_params()
        current = self.adapter.current_params()
        if self.structured:
            self._step_structured(window, current)
            self.steps += 1
            return
        self.active = window is not None and self._evidence(window, current)
        query = self._query
        if query is not None and self.active:
            obs, action, latent = query
            z = (
                torch.from_numpy(np.asarray(latent)).float()
                if self.uses_latent and latent is not None
                else None
            )
            cfg = self.adapter.config
            corrected = maml.correct_action(
                self._model, torch.from_numpy(obs).float(), torch.from_numpy(action).float(),
                z, self._reference, current, cfg.correction_steps, cfg.correction_lr,
                cfg.trust_weight,
            )
            offset = corrected.numpy() - action
            self._offset = np.clip(offset, -self.max_correction, self.max_correction).astype(
                np.float32
            )
        else:
            self._offset = np.zeros_like(self._offset)
        self.steps += 1

    def _step_structured(
        self, window: maml.TransitionBatch | None, current: Mapping[str, torch.Tensor]
    ) -> None:
        """Per-joint evidence, sign consistency, then the held gain ratio and bias torque."""
        query = self._query
        if window is None or query is None or self._reference is None:
            self._streak[:] = 0
            self.active = False
            return
        model = self._model
        assert isinstance(model, TorqueGainDynamics)
        holdout = window[-max(1, len(window) // 4) :]
        obs, action, latent = query
        obs_t = torch.from_numpy(np.asarray(obs, np.float32))[None]
        act_t = torch.from_numpy(np.asarray(action, np.float32))[None]
        z = (
            torch.from_numpy(np.asarray(latent, np.float32))[None]
            if self.uses_latent and latent is not None
            else None
        )
        with torch.no_grad():
            err_ref = per_joint_error(model, self._reference, holdout)
            err_now = per_joint_error(model, current, holdout)
            da = model.correction(obs_t, act_t, z, self._reference, current)[0].numpy()
            k_ref, beta_ref = head_at(self._reference)
            k_now, beta_now = head_at(current)
            _, b = model.parts_at(current, obs_t, z)
            ratio = (k_ref / k_now).numpy()
            bias = ((beta_ref - beta_now) / (k_now * b[0])).numpy()
            previous = self._previous if self._previous is not None else self._reference
            da_previous = model.correction(obs_t, act_t, z, self._reference, previous)[0].numpy()
        self._previous = current
        evidence = np.isfinite(err_now) & (err_now < (1.0 - self.min_improvement) * err_ref)
        # consistent: the previous adaptation implied a correction of the same sign here
        agrees = np.sign(da) == np.sign(da_previous)
        self._streak = np.where(evidence, np.where(agrees, self._streak + 1, 1), 0)
        active = self._streak >= self.confirmations
        self.active = bool(active.any())
        self._head_correction = (
            np.where(active, ratio, 1.0).astype(np.float32),
            np.where(active, bias, 0.0).astype(np.float32),
        )

    def _evidence(self, window: maml.TransitionBatch, current) -> bool:
        """Do the weights in use explain the newest data clearly better than the reference?"""
        if self._reference is None or current is self._reference:
            return False
        holdout = window[-max(1, len(window) // 4):]
        with torch.no_grad():
            loss_ref = float(maml.dynamics_loss(self._model, self._reference, holdout))
            loss_now = float(maml.dynamics_loss(self._model, current, holdout))
        return bool(np.isfinite(loss_now) and loss_now < (1.0 - self.min_improvement) * loss_ref)

    def maybe_step(self) -> None:
        """Inline mode: :meth:`step` every ``adapt_every`` transitions."""
        if self._since_step >= self.adapt_every:
            self._since_step = 0
            self.step()

    def start_background(self, period_s: float) -> None:
        """Run :meth:`step` every ``period_s`` in a daemon thread; errors are counted, logged
        and never stop the thread (nor the control loop)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(period_s):
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                    self.errors += 1
                    self.last_error = exc
                    _LOG.exception("MAML adaptation step failed (%d so far)", self.errors)

        self._thread = threading.Thread(target=loop, name="maml-adaptation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def dynamics_for(loaded: LoadedModel, with_latent: bool) -> AnyDynamics:
    name = "dynamics_latent" if with_latent else "dynamics_plain"
    if name not in loaded.dynamics or loaded.maml_config is None:
        raise CheckpointError(
            f"{loaded.path}: has no MAML dynamics model {name!r}; "
            "train with method pearl and dynamics.enabled"
        )
    return loaded.dynamics[name]


class TorchAdaptivePolicy:
    """PEARL (+ optional MAML correction) as an :class:`~metarl_ros.runtime.AdaptivePolicy`.

    Args:
        loaded: a loaded model (any method; non-latent methods have an empty posterior).
        latent_mode: ``mean`` (default, deterministic) or ``sample`` from the posterior.
        adaptation: run MAML online adaptation and action correction (needs a PEARL file).
        background: run adaptation in a background thread every ``adapt_period_s`` (the robot);
            otherwise inline every ``adapt_every`` transitions (deterministic evaluation).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        latent_mode: Literal["mean", "sample"] = "mean",
        adaptation: bool = False,
        background: bool = False,
        adapt_period_s: float = 0.1,
        dynamics_model: AnyDynamics | None = None,
        seed: int = 0,
    ) -> None:
        self.loaded = loaded
        self.contract = loaded.contract
        self.agent = loaded.agent
        spec = self.agent.spec
        if spec.conditioning == "oracle":
            raise CheckpointError(
                f"{loaded.path}: the oracle needs the true task and cannot run on a robot"
            )
        self.latent_mode = latent_mode
        self._generator = torch.Generator().manual_seed(seed)
        self.stream = (
            StreamingPosterior(self.agent.encoder, self.contract.window_size)
            if spec.conditioning == "latent"
            else None
        )
        self._noise = torch.zeros(spec.latent_dim)
        self.adaptation: DynamicsAdaptation | None = None
        if adaptation:
            model = dynamics_model or dynamics_for(loaded, with_latent=self.stream is not None)
            assert loaded.maml_config is not None
            self.adaptation = DynamicsAdaptation(model, loaded.maml_config)
        self.background = background
        self.adapt_period_s = adapt_period_s
        self.inference_time_s = 0.0
        self.reset()

    # --------------------------------------------------------------- AdaptivePolicy

    def reset(self) -> None:
        if self.stream is not None:
            self.stream.reset()
            self._noise = torch.randn(self.agent.spec.latent_dim, generator=self._generator)
        if self.adaptation is not None:
            self.adaptation.reset()
            if self.background:
                self.adaptation.start_background(self.adapt_period_s)

    def close(self) -> None:
        if self.adaptation is not None:
            self.adaptation.stop()

    def _latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            return torch.zeros(0), torch.zeros(0)
        mu, var = self.stream.posterior()
        return mu, var.sqrt()

    def observe(self, obs, action, reward, next_obs) -> None:
        latent_before = self._latent()[0].numpy()
        if self.stream is not None:
            transition = make_transition(
                torch.as_tensor(obs, dtype=torch.float32),
                torch.as_tensor(action, dtype=torch.float32),
                torch.tensor([float(reward)]),
                torch.as_tensor(next_obs, dtype=torch.float32),
            )
            self.stream.push(transition)
        if self.adaptation is not None:
            self.adaptation.record(
                np.asarray(obs, np.float32),
                np.asarray(action, np.float32),
                np.asarray(next_obs, np.float32),
                latent_before,
            )
            if not self.background:
                self.adaptation.maybe_step()

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        mu, std = self._latent()
        condition = (
            mu if self.latent_mode == "mean" or self.stream is None else mu + std * self._noise
        )
        action = self.agent.act(
            torch.as_tensor(obs, dtype=torch.float32)[None], condition[None], deterministic=True
        )[0].numpy()
        if self.adaptation is not None:
            action = self.adaptation.apply(
                np.asarray(obs, np.float32),
                action,
                mu.numpy() if self.stream is not None else None,
            )
        self.inference_time_s = time.perf_counter() - start
        return action

    def posterior(self) -> PosteriorSummary:
        mu, std = self._latent()
        return PosteriorSummary(
            mu.numpy(), std.numpy(), 0 if self.stream is None else len(self.stream)
        )


def load_adaptive_policy(
    model_path: str | Path, adaptation: bool = False, background: bool = True
) -> TorchAdaptivePolicy:
    """Entry point for the ROS adapter node (one torch thread: the control loop's inference
    must not fan out over the cores the rest of the robot needs)."""
    torch.set_num_threads(1)
    return TorchAdaptivePolicy(
        load_model(model_path), adaptation=adaptation, background=background
    )
