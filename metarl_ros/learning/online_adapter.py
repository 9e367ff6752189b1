"""On-robot GrBAL adaptation: bounded, validated, rolled back when worse, thread-safe.

:class:`OnlineAdapter` adapts a meta-trained dynamics model (:mod:`metarl_ros.learning.
maml_core`'s inner loop) on a window of recent transitions. Safety: adaptation starts from the
meta-init by default, steps are bounded, the candidate weights are validated on held-out recent
data and rolled back if they predict worse than the weights currently in use, and weight sets
are published as immutable, versioned snapshots so the control loop never sees a half update.

Thread-safety note: ``functional_call`` temporarily swaps the tensors *inside the module
object*, so one module instance must not be used by two threads at once; the adapter gives
every thread its own private copy of the module (weights come from the snapshot dicts, not
from the copy).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor, nn

from metarl_ros.learning.action_correction import correct_action
from metarl_ros.learning.dynamics_config import MAMLConfig
from metarl_ros.learning.dynamics_models import AnyDynamics
from metarl_ros.learning.maml_core import adapted_names, dynamics_loss, inner_adapt, params_of
from metarl_ros.learning.transitions import TransitionBatch

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamsSnapshot:
    """An immutable, versioned set of weights. ``params`` is a read-only mapping.

    Never modify the tensors in place: the same tensors may be in use by other threads.
    """

    version: int
    params: Mapping[str, Tensor]


@dataclass(frozen=True)
class AdaptationResult:
    """Outcome of :meth:`OnlineAdapter.adapt`.

    Attributes:
        accepted: the candidate weights were published.
        rolled_back: the candidate was rejected by the held-out check and the previous
            weights were kept exactly.
        reason: ``"improved"``, ``"held-out loss worse"``, ``"non-finite"`` or
            ``"superseded"`` (a :meth:`OnlineAdapter.reset` happened meanwhile; discarded).
        loss_before: held-out loss of the weights in use when the call started.
        loss_after: held-out loss of the candidate weights.
        loss_meta_init: held-out loss of the meta-init (for diagnostics).
        step_norm: global L2 norm of ``candidate - start`` over all parameters.
        duration_s: wall-clock duration of the call.
        n_adapt: transitions adapted on; ``n_holdout``: transitions held out.
        version: version of the weights in use after the call.
    """

    accepted: bool
    rolled_back: bool
    reason: str
    loss_before: float
    loss_after: float
    loss_meta_init: float
    step_norm: float
    duration_s: float
    n_adapt: int
    n_holdout: int
    version: int


class OnlineAdapter:
    """On-robot GrBAL adaptation with bounded steps, held-out validation and rollback.

    ``adapt(window)`` splits a time-ordered window into the older ``1 - holdout_fraction``
    (adapted on) and the most recent ``holdout_fraction`` (held out). Holding out the *latest*
    rows mirrors the meta-training objective (adapt on the past, predict the future) and tests
    exactly what the correction needs: prediction of the near future, not interpolation
    between correlated neighbouring samples.

    By default (``adapt_from="meta_init"``) every adaptation starts from the meta-learned
    init, as in GrBAL: meta-training only optimised the result of ``inner_steps`` steps *from
    the init*, so chained adaptations leave that regime, and a bad window cannot accumulate
    drift. ``adapt_from="current"`` continues from the weights in use (useful when the
    change is persistent and more steps help); the held-out check guards both.

    The candidate is accepted iff its held-out loss is finite and at most
    ``loss_before * (1 + rollback_tolerance)`` where ``loss_before`` is the held-out loss of
    the weights currently in use; otherwise the current weights stay (same tensor objects).

    Thread safety: the weights in use are one :class:`ParamsSnapshot` reference, replaced
    under a lock by a fully built new snapshot; readers (:meth:`snapshot`,
    :meth:`current_params`, :meth:`correct_action`) only take that reference, so they never
    see a partial update. ``adapt`` calls are serialised among themselves. Each thread gets its
    own copy of the model module for ``functional_call``.

    Args:
        model: a (meta-trained) dynamics model; its current parameters become the
            meta-init unless ``meta_params`` is given. Its normaliser buffers are copied.
        config: a :class:`MAMLConfig`.
        meta_params: optional explicit meta-init ``{name: tensor}``.
        on_update: optional callback ``(snapshot, result)`` called after a new snapshot is
            published (from the adapting thread; keep it short, it must not raise).
    """

    def __init__(
        self,
        model: AnyDynamics,
        config: MAMLConfig,
        meta_params: Mapping[str, Tensor] | None = None,
        on_update: Callable[[ParamsSnapshot, AdaptationResult], None] | None = None,
    ) -> None:
        self.config = config
        with torch.no_grad():
            self._template = copy.deepcopy(model)
        source = params_of(model) if meta_params is None else meta_params
        expected = {name for name, _ in model.named_parameters()}
        if set(source) != expected:
            raise ValueError("OnlineAdapter: meta_params keys do not match the model parameters")
        self._meta = MappingProxyType({k: v.detach().clone() for k, v in source.items()})
        self._on_update = on_update
        self._state_lock = threading.Lock()
        self._adapt_lock = threading.Lock()
        self._template_lock = threading.Lock()
        self._local = threading.local()
        self._snapshot = ParamsSnapshot(0, self._meta)
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._error_count = 0
        self._last_error: BaseException | None = None
        self._adapt_count = 0
        self._rollback_count = 0
        self._last_result: AdaptationResult | None = None

    # -- readers -------------------------------------------------------------------------------

    @property
    def meta_params(self) -> Mapping[str, Tensor]:
        """The meta-learned init (read-only, never modified)."""
        return self._meta

    def snapshot(self) -> ParamsSnapshot:
        """The weights in use together with their version (one atomic read)."""
        with self._state_lock:
            return self._snapshot

    def current_params(self) -> Mapping[str, Tensor]:
        """The weights in use (read-only mapping; do not modify the tensors)."""
        return self.snapshot().params

    @property
    def version(self) -> int:
        return self.snapshot().version

    @property
    def error_count(self) -> int:
        """Exceptions caught in the background thread."""
        with self._state_lock:
            return self._error_count

    @property
    def last_error(self) -> BaseException | None:
        with self._state_lock:
            return self._last_error

    @property
    def adapt_count(self) -> int:
        with self._state_lock:
            return self._adapt_count

    @property
    def rollback_count(self) -> int:
        with self._state_lock:
            return self._rollback_count

    @property
    def last_result(self) -> AdaptationResult | None:
        with self._state_lock:
            return self._last_result

    def _module(self) -> nn.Module:
        """This thread's private copy of the model (``functional_call`` mutates modules)."""
        module = getattr(self._local, "module", None)
        if module is None:
            with self._template_lock, torch.no_grad():
                module = copy.deepcopy(self._template)
            self._local.module = module
        return module

    # -- adaptation ----------------------------------------------------------------------------

    def split(self, window: TransitionBatch) -> tuple[TransitionBatch, TransitionBatch]:
        """Split a time-ordered window into (adaptation part, held-out most recent part)."""
        n = len(window)
        if n < self.config.min_window:
            raise ValueError(
                f"OnlineAdapter.adapt: window has {n} transitions, min_window is "
                f"{self.config.min_window}"
            )
        n_hold = min(n - 1, max(1, round(n * self.config.holdout_fraction)))
        n_adapt = n - n_hold
        return window[:n_adapt], window[n_adapt:]

    def adapt(self, window: TransitionBatch) -> AdaptationResult:
        """Adapt to a time-ordered window; publish the result only if it validates.

        Runs ``config.inner_steps`` bounded SGD steps (values are those of the meta-training
        inner loop; no second-order graph is needed online) on the older part of the window,
        compares held-out losses and accepts or rolls back. See the class docstring.
        """
        t0 = time.perf_counter()
        cfg = self.config
        adapt_part, held_out = self.split(window)
        module = self._module()
        with self._adapt_lock:
            base = self.snapshot()
            start = self._meta if cfg.adapt_from == "meta_init" else base.params
            candidate_graph = inner_adapt(
                module,
                start,
                adapt_part,
                cfg.inner_steps,
                cfg.inner_lr,
                first_order=True,
                max_step_norm=cfg.max_step_norm,
                adapt_names=adapted_names(module),
            )
            candidate = {k: v.detach() for k, v in candidate_graph.items()}
            del candidate_graph
            with torch.no_grad():
                loss_before = float(dynamics_loss(module, base.params, held_out))
                loss_after = float(dynamics_loss(module, candidate, held_out))
                loss_init = (
                    loss_before
                    if base.params is self._meta
                    else float(dynamics_loss(module, self._meta, held_out))
                )
                step_norm = math.sqrt(
                    sum(float(torch.sum((candidate[k] - start[k]) ** 2)) for k in candidate)
                )
            finite = math.isfinite(loss_after) and all(
                bool(torch.isfinite(v).all()) for v in candidate.values()
            )
            if not finite:
                accepted, reason = False, "non-finite"
            elif loss_after <= loss_before * (1.0 + cfg.rollback_tolerance):
                accepted, reason = True, "improved"
            else:
                accepted, reason = False, "held-out loss worse"
            new_snapshot: ParamsSnapshot | None = None
            with self._state_lock:
                superseded = self._snapshot is not base
                if accepted and superseded:
                    accepted, reason = False, "superseded"
                if accepted:
                    new_snapshot = ParamsSnapshot(base.version + 1, MappingProxyType(candidate))
                    self._snapshot = new_snapshot
                rolled_back = not accepted and reason != "superseded"
                self._adapt_count += 1
                self._rollback_count += int(rolled_back)
                result = AdaptationResult(
                    accepted=accepted,
                    rolled_back=rolled_back,
                    reason=reason,
                    loss_before=loss_before,
                    loss_after=loss_after,
                    loss_meta_init=loss_init,
                    step_norm=step_norm,
                    duration_s=time.perf_counter() - t0,
                    n_adapt=len(adapt_part),
                    n_holdout=len(held_out),
                    version=self._snapshot.version,
                )
                self._last_result = result
        if rolled_back:
            LOGGER.info(
                "MAML adaptation rolled back (%s): held-out loss %.4g -> %.4g",
                reason,
                loss_before,
                loss_after,
            )
        if new_snapshot is not None and self._on_update is not None:
            self._on_update(new_snapshot, result)
        return result

    def reset(self) -> ParamsSnapshot:
        """Go back to the meta-init (as a new version); an adaptation in flight is discarded."""
        with self._state_lock:
            self._snapshot = ParamsSnapshot(self._snapshot.version + 1, self._meta)
            return self._snapshot

    # -- correction ----------------------------------------------------------------------------

    def correct_action(
        self,
        obs: Tensor,
        action: Tensor,
        z: Tensor | None = None,
        action_low: float | Tensor = -1.0,
        action_high: float | Tensor = 1.0,
        snapshot: ParamsSnapshot | None = None,
    ) -> Tensor:
        """:func:`correct_action` with the meta-init as prior and the weights in use (or the
        given ``snapshot``) as adapted model; shapes as there. Safe to call from any thread."""
        snap = self.snapshot() if snapshot is None else snapshot
        cfg = self.config
        return correct_action(
            self._module(),
            obs,
            action,
            z,
            self._meta,
            snap.params,
            cfg.correction_steps,
            cfg.correction_lr,
            cfg.trust_weight,
            action_low,
            action_high,
        )

    # -- background thread ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_background(
        self, get_window: Callable[[], TransitionBatch | None], period_s: float
    ) -> None:
        """Adapt every ``period_s`` seconds on ``get_window()`` in a daemon thread.

        ``get_window`` returns the latest time-ordered window, or ``None`` to skip (windows
        shorter than ``min_window`` are skipped too). Any exception from ``get_window`` or
        ``adapt`` is logged, counted in :attr:`error_count` / :attr:`last_error` and the loop
        continues.
        """
        if not period_s > 0:
            raise ValueError(f"start_background: period_s must be > 0, got {period_s!r}")
        if self.running:
            raise RuntimeError("OnlineAdapter: background adaptation already running")
        self._stop_event = threading.Event()
        stop_event = self._stop_event

        def loop() -> None:
            while not stop_event.is_set():
                t0 = time.monotonic()
                try:
                    window = get_window()
                    if window is not None and len(window) >= self.config.min_window:
                        self.adapt(window)
                except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                    LOGGER.exception("MAML background adaptation failed")
                    with self._state_lock:
                        self._error_count += 1
                        self._last_error = exc
                stop_event.wait(max(0.0, period_s - (time.monotonic() - t0)))

        self._thread = threading.Thread(target=loop, name="maml-online-adapter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background thread (waits up to ``timeout`` for the current adaptation)."""
        self._stop_event.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                self._thread = None
