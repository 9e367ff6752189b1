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

from metarl_ros.learning import maml
from metarl_ros.learning.agent import AgentSpec, ConditionedSAC
from metarl_ros.learning.checkpoint import CheckpointError, load_model_payload, load_state_strict
from metarl_ros.learning.encoder import StreamingPosterior, make_transition
from metarl_ros.runtime import PolicyContract, PosteriorSummary

_LOG = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model file turned back into networks."""

    agent: ConditionedSAC
    payload: dict
    dynamics: dict[str, maml.DynamicsModel]
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
    dynamics: dict[str, maml.DynamicsModel] = {}
    specs = payload["metadata"].get("dynamics_specs", {})
    for name, state in payload.get("extra", {}).items():
        if name not in specs:
            raise CheckpointError(f"{source}: dynamics model {name!r} has no spec")
        s = specs[name]
        model = maml.DynamicsModel(
            s["obs_dim"],
            s["act_dim"],
            s["target_dim"],
            latent_dim=s["latent_dim"],
            hidden_sizes=tuple(s["hidden_sizes"]),
        )
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

    Args:
        model: the meta-trained dynamics model (with or without latent input).
        config: inner-loop settings (as meta-trained).
        window: how many recent transitions adaptation uses.
        adapt_every: inline mode: run :meth:`step` after this many new transitions.
    """

    def __init__(
        self,
        model: maml.DynamicsModel,
        config: maml.MAMLConfig,
        window: int = 60,
        adapt_every: int = 10,
        min_improvement: float = 0.6,
        max_correction: float = 0.1,
    ) -> None:
        self.adapter = maml.OnlineAdapter(model, config)
        # private copy: functional calls swap tensors inside the module (not thread-safe)
        self._model = copy.deepcopy(model)
        self.uses_latent = model.latent_dim > 0
        self.window: deque[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = deque(
            maxlen=window
        )
        self.adapt_every = adapt_every
        self.min_improvement = min_improvement
        self.max_correction = max_correction
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
        self.adapter.reset()
        self._since_step = 0

    # ------------------------------------------------------------ control-loop side (cheap)

    def apply(self, obs: np.ndarray, action: np.ndarray, latent: np.ndarray | None) -> np.ndarray:
        """Remember the query for the next :meth:`step`; return ``action`` + held offset."""
        self._query = (obs, action, latent)
        return np.clip(action + self._offset, -1.0, 1.0).astype(np.float32)

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


def dynamics_for(loaded: LoadedModel, with_latent: bool) -> maml.DynamicsModel:
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
        dynamics_model: maml.DynamicsModel | None = None,
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
