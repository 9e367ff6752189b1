"""The MAML adaptation process itself (the child side of
:mod:`metarl_ros.policy.adaptation_process`, which starts it as ``python -m
metarl_ros.policy.adaptation_worker <records fd> <reports fd>``).

It reads the :class:`~metarl_ros.policy.adaptation_process.WorkerSpec`, builds the dynamics
model and :class:`~metarl_ros.policy.dynamics_adaptation.DynamicsAdaptation`, reports that it
is ready, then every ``period_s`` of wall time: takes the records that accumulated in the pipe,
steps, reports. It returns on EOF of the records pipe (the control process closed it or is
gone) or a broken reports pipe.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from metarl_ros.policy.adaptation_process import (
    QUERY,
    RESET,
    SPEC_LENGTH,
    TRANSITION,
    AdaptationReport,
    RecordLayout,
    WorkerSpec,
)


NICE = 5
"""The child's niceness (below the control process's; a real-time policy it inherited from a
``chrt``-started node is dropped first)."""


class RecordReader:
    """The child's end of the records pipe: the start-up spec (8-byte length, then a pickle),
    then fixed-size float32 records. Raises ``EOFError`` once the control side is gone.

    After the spec the child does not wait on the pipe (each record would wake it, and the
    wake-up is paid in the control tick's write): it sleeps until its next step and then takes
    what accumulated (:meth:`records`; the pipe holds seconds of records:
    :data:`~metarl_ros.policy.adaptation_process.PIPE_BYTES`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def _read(self) -> bool:
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            raise EOFError("the control process closed the records pipe")
        self._buffer += chunk
        return True

    def spec(self) -> WorkerSpec:
        while len(self._buffer) < SPEC_LENGTH.size:
            self._read()
        (size,) = SPEC_LENGTH.unpack_from(self._buffer)
        while len(self._buffer) < SPEC_LENGTH.size + size:
            self._read()
        data = bytes(self._buffer[SPEC_LENGTH.size:SPEC_LENGTH.size + size])
        del self._buffer[:SPEC_LENGTH.size + size]
        return pickle.loads(data)

    def records(self, width: int) -> list[np.ndarray]:
        """The complete records that arrived since the last call (never waits)."""
        os.set_blocking(self.fd, False)
        while self._read():
            pass
        size = 4 * width
        count = len(self._buffer) // size
        out = [np.frombuffer(self._buffer, np.float32, width, i * size).copy()
               for i in range(count)]
        del self._buffer[:count * size]
        return out


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``<records fd> <reports fd>``."""
    _lower_priority(NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    records_fd, reports_fd = (int(v) for v in (argv or sys.argv[1:]))
    records = RecordReader(records_fd)
    reports = Connection(reports_fd, readable=False)
    try:
        spec = records.spec()
    except (EOFError, OSError):
        return 0
    serve(spec, records, reports)
    return 0


def serve(spec: WorkerSpec, records: RecordReader, reports: Connection) -> None:
    """The child's main loop: take records, step every ``spec.period_s``, report; return on
    EOF of ``records`` or a broken ``reports`` pipe."""
    import torch

    from metarl_ros.learning.dynamics_models import load_checkpoint
    from metarl_ros.policy.dynamics_adaptation import DynamicsAdaptation

    torch.set_num_threads(1)
    checkpoint = dict(spec.checkpoint)
    checkpoint["model_state"] = {k: torch.from_numpy(np.array(v))
                                 for k, v in checkpoint["model_state"].items()}
    model, config = load_checkpoint(checkpoint)
    adaptation = DynamicsAdaptation(model, config, **spec.options)
    parts = spec.layout.slices()
    epoch, transitions = 0, 0
    try:
        reports.send(_report(adaptation, epoch, transitions, 0.0))  # ready
        next_step = time.monotonic() + spec.period_s
        while True:
            time.sleep(max(0.0, next_step - time.monotonic()))
            next_step = max(next_step + spec.period_s, time.monotonic())  # no burst after a stall
            for record in records.records(spec.layout.width):
                flags, epoch_of = int(record[0]), int(record[1])
                if flags & RESET or epoch_of != epoch:  # (a dropped reset: a new epoch)
                    epoch, transitions = epoch_of, 0
                    adaptation.reset()
                transitions += _take(adaptation, flags, record, parts, spec.layout)
            start = time.perf_counter()
            adaptation.guarded_step()
            reports.send(_report(adaptation, epoch, transitions, time.perf_counter() - start))
    except (EOFError, OSError):  # the control process closed the pipes or is gone
        return


def _take(adaptation: Any, flags: int, record: np.ndarray, parts: dict[str, slice],
          layout: RecordLayout) -> int:
    """Hand a record's transition and query to ``adaptation``; returns 1 if it held a
    transition."""
    def latent(key: str) -> np.ndarray | None:
        return record[parts[key]] if layout.latent_dim else None

    if flags & QUERY:
        adaptation.set_query(record[parts["query_obs"]], record[parts["query_action"]],
                             latent("query_latent"))
    if flags & TRANSITION:
        adaptation.record(record[parts["obs"]], record[parts["action"]],
                          record[parts["next_obs"]], latent("latent"))
        return 1
    return 0


def _report(adaptation: Any, epoch: int, transitions: int, duration_s: float
            ) -> AdaptationReport:
    result = adaptation.last_result
    held = adaptation.held()
    error = adaptation.last_error
    return AdaptationReport(
        epoch=epoch, steps=adaptation.steps, held=held.to_arrays(), active=held.active,
        version=adaptation.adapter.version,
        accepted=None if result is None else result.accepted,
        rolled_back=None if result is None else result.rolled_back,
        reason="" if result is None else result.reason,
        adaptations=adaptation.adapter.adapt_count, rollbacks=adaptation.adapter.rollback_count,
        errors=adaptation.errors,
        last_error="" if error is None else f"{type(error).__name__}: {error}",
        duration_s=duration_s, transitions=transitions)


def _lower_priority(nice: int) -> None:
    """Adaptation yields to control: normal scheduling (not an inherited real-time policy),
    then ``nice``. Best effort."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    try:
        os.nice(nice)
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
