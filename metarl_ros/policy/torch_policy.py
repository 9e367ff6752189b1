"""Load trained models and run them online: the torch implementation of
:class:`metarl_ros.control.policy_interface.AdaptivePolicy`.

:class:`TorchAdaptivePolicy` keeps a streaming posterior over the last ``window_size``
transitions (PEARL), acts with the latent-conditioned actor, and -- with adaptation on and a
MAML dynamics model in the file -- runs
:class:`~metarl_ros.learning.online_adapter.OnlineAdapter` on the recent transitions (inline in
evaluation and lockstep simulation, or in a background thread) and corrects the actor's action
with the adapted model. On a robot the adapter node does not run this class with MAML: a thread
shares the control loop's GIL, so it runs
:class:`~metarl_ros.policy.process_adapted.ProcessAdaptedPolicy` (MAML in its own process).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from metarl_ros.control.measured import MeasuredObservation
from metarl_ros.control.policy_interface import PosteriorSummary
from metarl_ros.learning.checkpoint import CheckpointError
from metarl_ros.learning.dynamics_models import AnyDynamics
from metarl_ros.learning.encoder import StreamingPosterior, make_transition
from metarl_ros.learning.saved_model import LoadedModel, load_model
from metarl_ros.policy.dynamics_adaptation import DynamicsAdaptation, dynamics_for

_LOG = logging.getLogger(__name__)


class TorchAdaptivePolicy:
    """PEARL (+ optional MAML correction) as an
    :class:`~metarl_ros.control.policy_interface.AdaptivePolicy`.

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
        self.base_acts_on_reference = spec.actor_view == "reference"
        """:meth:`base_act` (the actor) reads the observation's reference view only"""
        self.acts_on_reference = self.base_acts_on_reference and not adaptation
        """the action depends on the observation only through its reference view (never
        with the MAML correction: it scales the commanded torque, PD feedback included, and
        its lag gate reads the measured tracking error; control.policy_interface.ahead_parts)"""
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

    def act(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        measured = MeasuredObservation.given(obs, self.contract.act_dim)
        action = self.correct(measured, self.base_act(obs))
        self.inference_time_s = time.perf_counter() - start
        return action

    @torch.no_grad()
    def base_act(self, obs: np.ndarray) -> np.ndarray:
        """The actor's action (act_dim,) on the current posterior, before the MAML correction,
        for ``obs`` (obs_dim,)."""
        mu, std = self._latent()
        condition = (
            mu if self.latent_mode == "mean" or self.stream is None else mu + std * self._noise
        )
        return self.agent.act(
            torch.as_tensor(obs, dtype=torch.float32)[None], condition[None], deterministic=True
        )[0].numpy()

    def correct(self, measured: MeasuredObservation, action: np.ndarray) -> np.ndarray:
        """``action`` (act_dim,) with the MAML correction applied on the ``measured``
        observation; unchanged without adaptation."""
        if self.adaptation is None:
            return action
        return self.adaptation.apply(
            measured.observation(),
            action,
            self.latent_mean() if self.stream is not None else None,
        )

    def latent_mean(self) -> np.ndarray:
        """The posterior mean over the transitions observed so far, (latent_dim,) float32
        (empty for a model without latent)."""
        return self._latent()[0].numpy()

    def posterior(self) -> PosteriorSummary:
        mu, std = self._latent()
        return PosteriorSummary(
            mu.numpy(), std.numpy(), 0 if self.stream is None else len(self.stream)
        )


def load_adaptive_policy(
    model_path: str | Path | LoadedModel, adaptation: bool = False, background: bool = True
) -> TorchAdaptivePolicy:
    """Entry point for the ROS adapter node (one torch thread: the control loop's inference
    must not fan out over the cores the rest of the robot needs). Takes a model file or an
    already loaded model."""
    torch.set_num_threads(1)
    loaded = model_path if isinstance(model_path, LoadedModel) else load_model(model_path)
    return TorchAdaptivePolicy(loaded, adaptation=adaptation, background=background)
