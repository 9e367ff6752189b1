"""PEARL + MAML for a robot: the control path without torch, the adaptation in its own process.

:class:`ProcessAdaptedPolicy` is what ``policy: pearl`` with MAML and ``adaptation_schedule:
background`` runs. Per control tick it does no torch work:

* PEARL's streaming posterior and actor run in onnxruntime
  (:class:`~metarl_ros.policy.onnx_policy.OnnxAdaptivePolicy`, ``step.onnx``: one call per
  tick), on graphs exported from the loaded ``model.pt`` at start-up
  (:func:`~metarl_ros.policy.onnx_export.write_graphs`, parity-checked against torch on
  random inputs). If that export is impossible (no ``onnx`` package, parity refused), the
  torch posterior and actor are used instead, with a warning;
* the MAML correction is the held :class:`~metarl_ros.policy.held_correction.HeldCorrection`
  (numpy), replaced whole when the adaptation process
  (:mod:`metarl_ros.policy.adaptation_process`) reports a new one.

The adaptation process gets every transition and the state each action was computed in; it
runs :class:`~metarl_ros.policy.dynamics_adaptation.DynamicsAdaptation` every ``period_s`` of
wall time (bounded steps, held-out validation and rollback, versioned snapshots, as in
process). If it dies, the policy keeps acting with the un-adapted correction and
:meth:`ProcessAdaptedPolicy.status` warns.

``inline`` (deterministic lockstep, evaluation) stays
:class:`~metarl_ros.policy.torch_policy.TorchAdaptivePolicy`: adaptation in the control
callback, every ``adapt_every`` transitions.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from metarl_ros.control.measured import MeasuredObservation
from metarl_ros.control.policy_interface import PolicyStatus, PosteriorSummary
from metarl_ros.learning.dynamics_models import make_checkpoint
from metarl_ros.learning.saved_model import LoadedModel
from metarl_ros.policy.adaptation_process import (
    AdaptationProcess,
    RecordLayout,
    WorkerSpec,
)
from metarl_ros.policy.dynamics_adaptation import correction_settings, dynamics_for
from metarl_ros.policy.held_correction import CorrectionApplier, HeldCorrection

_LOG = logging.getLogger(__name__)

STALE_AFTER_PERIODS = 20
"""No adaptation report for this many periods: the process is reported as stalled."""
POLL_EVERY_TICKS = 4
"""Look for a new report (a system call, and unpickling one if it came) after every this
many commands (:meth:`ProcessAdaptedPolicy.after_command`, off the sensor-to-command path),
and at every context update: reports come every adaptation period (0.1 s)."""


class ProcessAdaptedPolicy:
    """PEARL posterior and actor (``inner``) plus the MAML correction held from an adaptation
    process (module docstring). An :class:`~metarl_ros.control.policy_interface.
    AdaptivePolicy` with ``status()``.

    Args:
        inner: the posterior and actor: an ``OnnxAdaptivePolicy`` (or a
            ``TorchAdaptivePolicy`` without adaptation); needs ``latent_mean()``.
        applier: applies the held correction.
        process: the adaptation process (started).
        control_path: ``onnx`` or ``torch`` (for diagnostics).
    """

    def __init__(self, inner: Any, applier: CorrectionApplier, process: AdaptationProcess,
                 control_path: str = "onnx") -> None:
        self.inner = inner
        self.contract = inner.contract
        self.applier = applier
        self.process = process
        self.adaptation = process  # ``steps`` for the launch summary, as the torch policy's
        # The correction reads the measured state (the whole observation, not the actor's
        # view): the structured model's commanded torque includes the PD feedback on the
        # tracking error, and its lag gate averages that error. So only the actor's part can
        # be computed before the joint state arrives (act_ahead): ``base_act`` then, and
        # ``correct`` at the joint state (control.policy_interface.ahead_parts).
        self.base_acts_on_reference = bool(getattr(inner, "acts_on_reference", False))
        self.acts_on_reference = (self.base_acts_on_reference
                                  and not applier.settings.structured)
        self.control_path = control_path
        self.inference_time_s = 0.0
        self._ticks = 0
        self._polled_at = 0  # self._ticks when after_command last took a report
        self._applied_steps = 0
        self._fallback = False  # the un-adapted correction after the process died
        self._query: tuple | None = None  # (measured obs, action, latent) of the last correct
        self.reset()

    # --------------------------------------------------------------- AdaptivePolicy

    def reset(self) -> None:
        self.inner.reset()
        self.applier.reset()
        self.process.reset()
        self._applied_steps = 0
        self._query = None

    def observe(self, obs, action, reward, next_obs) -> None:
        self._queue_query()  # the query of the action this transition started with goes first
        latent_before = self.inner.latent_mean()
        self.inner.observe(obs, action, reward, next_obs)
        self.process.record(obs, action, next_obs, latent_before)

    def act(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        measured = MeasuredObservation.given(obs, self.applier.settings.act_dim)
        corrected = self.correct(measured, self.base_act(obs))
        self.inference_time_s = time.perf_counter() - start
        return corrected

    def base_act(self, obs: np.ndarray) -> np.ndarray:
        """The inner policy's action (act_dim,) before the correction, on ``obs`` (obs_dim,)."""
        return self.inner.act(obs)

    def correct(self, measured: MeasuredObservation, action: np.ndarray) -> np.ndarray:
        """``action`` (act_dim,) of :meth:`base_act` with the held correction applied on the
        ``measured`` observation's tracking errors; the pair goes to the adaptation process
        with the next :meth:`after_command` (the whole observation is built and copied into
        its record there, off the sensor-to-command path)."""
        self._ticks += 1
        self._queue_query()  # one not handed over yet (no after_command since): it goes first
        corrected = self.applier.apply_to_errors(measured.tracking_errors(), action)
        self._query = (measured, action, self.inner.latent_mean())
        return corrected

    def after_command(self) -> None:
        """Send the adaptation process this tick's record and, every
        :data:`POLL_EVERY_TICKS` ticks, take its newest report (the control loop calls this
        once the command is published, keeping the pipe's system calls off the
        sensor-to-command path; otherwise the next record or query sends the record, and the
        next context update takes the report)."""
        self._queue_query()
        self.process.flush()
        if self._ticks - self._polled_at >= POLL_EVERY_TICKS:
            self._polled_at = self._ticks
            self._take_report()

    def posterior(self) -> PosteriorSummary:
        return self.inner.posterior()

    def update_context(self) -> None:
        """The inner policy's context update (if any), and a check that the adaptation
        process still runs (the control loop calls this at its context rate)."""
        update = getattr(self.inner, "update_context", None)
        if callable(update):
            update()
        self.process.check()
        self._take_report()

    def close(self) -> None:
        self.process.close()
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    # --------------------------------------------------------------- adaptation

    def _queue_query(self) -> None:
        """Put the last :meth:`correct`'s query in the process's record (sent at its flush,
        or with the next record)."""
        query, self._query = self._query, None
        if query is not None:
            measured, action, latent = query
            self.process.query(measured.observation(), action, latent, send=False)

    def _take_report(self) -> None:
        report = self.process.poll()
        if report is not None and report.steps > self._applied_steps:
            self.applier.hold(report.correction())
            self._applied_steps = report.steps
        elif not self.process.alive and not self._fallback and self.process.info.state == "dead":
            self.applier.hold(HeldCorrection.none(self.applier.settings.act_dim))
            self._fallback = True

    def status(self) -> PolicyStatus:
        """The adaptation process on ``/diagnostics`` (keys ``maml.*``)."""
        info = self.process.info
        report = info.last_report
        age = (float("nan") if info.last_report_wall is None
               else time.monotonic() - info.last_report_wall)
        values = {
            "maml.adaptation": "process",
            "maml.control_path": self.control_path,
            "maml.process_state": info.state,
            "maml.process_pid": str(info.pid),
            "maml.steps": str(0 if report is None else report.steps),
            "maml.snapshot_version": str(0 if report is None else report.version),
            "maml.last_outcome": "" if report is None else report.reason,
            "maml.rollbacks": str(0 if report is None else report.rollbacks),
            "maml.correction_active": str(bool(report is not None and report.active
                                               and not self._fallback)),
            "maml.step_ms": f"{0.0 if report is None else report.duration_s * 1e3:.2f}",
            "maml.report_age_s": f"{age:.2f}",
            "maml.dropped_records": str(info.dropped_records),
            "maml.errors": str(0 if report is None else report.errors),
            "maml.last_error": "" if report is None else report.last_error,
        }
        if info.state == "dead":
            return PolicyStatus("warn", f"MAML {info.failure}: acting with the un-adapted "
                                        "correction", values)
        period = self.process.spec.period_s
        if info.state == "running" and age > STALE_AFTER_PERIODS * period:
            return PolicyStatus("warn", f"MAML adaptation process silent for {age:.1f} s: "
                                        "holding its last correction", values)
        if report is not None and report.errors:
            return PolicyStatus("warn", f"MAML adaptation errors: {report.errors} "
                                        f"({report.last_error})", values)
        return PolicyStatus("ok", f"MAML adaptation process {info.state}", values)


def onnx_control_path(loaded: LoadedModel) -> Any:
    """PEARL's posterior and actor in onnxruntime, from graphs of ``loaded`` exported now
    into a temporary directory (removed once loaded) and parity-checked against torch on
    random inputs. Raises if the export is not possible or not faithful."""
    from metarl_ros.policy.onnx_export import (
        PARITY_TOLERANCE,
        ExportError,
        check_parity,
        write_graphs,
    )
    from metarl_ros.policy.onnx_policy import OnnxAdaptivePolicy

    directory = Path(tempfile.mkdtemp(prefix="metarl_control_path_"))
    try:
        write_graphs(loaded, directory)
        _, worst = check_parity(loaded, directory, recorded=False)
        if not worst <= PARITY_TOLERANCE:
            raise ExportError(f"{loaded.path}: ONNX differs from torch by {worst:.2e}")
        return OnnxAdaptivePolicy(directory)  # sessions hold the graphs in memory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load_process_adapted_policy(loaded: LoadedModel, period_s: float = 0.1,
                                control_path: str = "onnx") -> ProcessAdaptedPolicy:
    """The robot's PEARL+MAML policy for a loaded PEARL model (module docstring).
    ``control_path``: ``onnx`` (torch if the export fails) or ``torch``."""
    import torch

    from metarl_ros.policy.torch_policy import TorchAdaptivePolicy

    torch.set_num_threads(1)  # the control process's torch (start-up, fallback): one thread
    inner: Any = None
    if control_path == "onnx":
        try:
            inner = onnx_control_path(loaded)
        except Exception as exc:  # noqa: BLE001 - any export failure: torch control path
            _LOG.warning("ONNX control path not available (%s: %s); PEARL runs in torch in "
                         "the control loop", type(exc).__name__, exc)
            control_path = "torch"
    if inner is None:
        inner = TorchAdaptivePolicy(loaded)
    model = dynamics_for(loaded, with_latent=loaded.contract.latent_dim > 0)
    assert loaded.maml_config is not None
    checkpoint = make_checkpoint(model, loaded.maml_config)
    checkpoint["model_state"] = {k: v.numpy() for k, v in checkpoint["model_state"].items()}
    c = loaded.contract
    spec = WorkerSpec(checkpoint=checkpoint, options={}, period_s=period_s,
                      layout=RecordLayout(c.obs_dim, c.act_dim, model.latent_dim))
    return ProcessAdaptedPolicy(inner, CorrectionApplier(correction_settings(model)),
                                AdaptationProcess(spec), control_path)
