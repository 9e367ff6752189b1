"""MAML adaptation in a process of its own, so that it never holds the control loop's GIL.

A robot's adapter runs the MAML inner loop (:class:`~metarl_ros.policy.dynamics_adaptation.
DynamicsAdaptation`: torch, a few ms of small ops every 0.1 s) beside a control tick that must
answer within a fraction of a millisecond. In one process the two share the GIL, and the tick
waits up to the interpreter's switch interval (5 ms) behind the adaptation thread. Here the
adaptation runs in a child process (:mod:`metarl_ros.policy.adaptation_worker`) -- a fresh
interpreter that imports torch, not a fork of the control process; unlike
``multiprocessing``'s ``spawn`` it does not re-import the parent's ``__main__`` (a node, a
test runner or a script without a main guard). This module is the control side and what the
two sides share:

* control -> child: one fixed-size float32 record per tick on a pipe -- the transition that
  ended (for the adaptation window) and the state the policy acted in (the query the held
  correction is computed for). The pipe is non-blocking and each record is smaller than
  ``PIPE_BUF`` (written whole or not at all): if the child falls behind, records are dropped
  and counted, the control loop never waits.
* child -> control: after each adaptation step (every ``period_s`` of wall time), an
  :class:`AdaptationReport`: the :class:`~metarl_ros.policy.held_correction.HeldCorrection`
  (per-joint gain ratio and bias torque, or the MLP's action offset: ``3 n`` numbers) with the
  adapter's snapshot version, accepted/rolled-back outcome and counters. The control side
  polls it without blocking and applies it whole.

The child reads the records' pipe at every step, so it exits within a period once the control
process closes it or dies (EOF); the control process also stops it at exit. It ignores SIGINT
(a Ctrl-C in the terminal reaches the whole process group: the node shuts down, then closes
it) and lowers its own scheduling priority. If the child dies, :meth:`AdaptationProcess.poll`
notices (EOF) and the caller falls back to the un-adapted correction;
:attr:`AdaptationProcess.info` says so. Reports of an earlier :meth:`AdaptationProcess.reset`
epoch are discarded.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from metarl_ros.policy.held_correction import HeldCorrection

_LOG = logging.getLogger(__name__)

TRANSITION, QUERY, RESET = 1, 2, 4
"""record flags: carries a transition, carries a query, start a new epoch (reset)."""
SPEC_LENGTH = struct.Struct("<Q")
"""the start-up spec's length prefix (then the pickled :class:`WorkerSpec`)."""


@dataclass(frozen=True)
class RecordLayout:
    """Where each part of a record lies (float32 offsets): ``[flags, epoch, obs, action,
    next_obs, latent, query_obs, query_action, query_latent]``."""

    obs_dim: int
    act_dim: int
    latent_dim: int

    @property
    def width(self) -> int:
        return 2 + 3 * self.obs_dim + 2 * self.act_dim + 2 * self.latent_dim

    def slices(self) -> dict[str, slice]:
        o, a, z = self.obs_dim, self.act_dim, self.latent_dim
        sizes = (("obs", o), ("action", a), ("next_obs", o), ("latent", z),
                 ("query_obs", o), ("query_action", a), ("query_latent", z))
        out, start = {}, 2
        for name, size in sizes:
            out[name] = slice(start, start + size)
            start += size
        return out


@dataclass(frozen=True)
class WorkerSpec:
    """What the child needs: the dynamics model as a ``make_checkpoint`` dict with numpy
    arrays for tensors, :class:`DynamicsAdaptation` keyword arguments, the period."""

    checkpoint: dict
    options: dict
    period_s: float
    layout: RecordLayout


@dataclass(frozen=True)
class AdaptationReport:
    """One adaptation step's outcome, child -> control."""

    epoch: int
    steps: int
    held: np.ndarray  # (3, n): ratio, bias, offset (HeldCorrection.to_arrays)
    active: bool
    version: int
    accepted: bool | None
    rolled_back: bool | None
    reason: str
    adaptations: int
    rollbacks: int
    errors: int
    last_error: str
    duration_s: float
    transitions: int

    def correction(self) -> HeldCorrection:
        return HeldCorrection.from_arrays(self.held, self.active)


# ------------------------------------------------------------------------------ control side


@dataclass
class ProcessState:
    """What the control side knows about its adaptation process (for diagnostics)."""

    state: str = "starting"  # starting | running | dead | closed
    pid: int | None = None
    exit_code: int | None = None
    reports: int = 0
    dropped_records: int = 0
    last_report: AdaptationReport | None = None
    last_report_wall: float | None = None
    failure: str = ""


class AdaptationProcess:
    """The control side of a MAML adaptation child process (module docstring).

    ``record`` / ``query`` / ``poll`` / ``reset`` are meant for the control thread and never
    block; ``check`` and ``info`` may be used from another thread. Records are sent once the
    child has loaded (its first report); before that, and after it died, they are not sent.

    Args:
        spec: what the child runs.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.layout = spec.layout
        self._parts = self.layout.slices()
        self._record = np.zeros(self.layout.width, np.float32)
        if self._record.nbytes > select.PIPE_BUF:
            raise ValueError(f"an adaptation record of {self._record.nbytes} bytes is over "
                             f"PIPE_BUF ({select.PIPE_BUF}): it could not be written atomically")
        self._epoch = 0
        self.info = ProcessState()
        records_in, records_out = os.pipe()
        reports_in, reports_out = os.pipe()
        env = dict(os.environ)  # the child finds the modules this process found
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in sys.path if p] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "metarl_ros.policy.adaptation_worker", str(records_in),
                 str(reports_out)],
                pass_fds=(records_in, reports_out), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(records_in)  # the child holds them now: EOF reaches each side when the
            os.close(reports_out)  # other closes or dies
        _enlarge(records_out)
        self._records = records_out
        self._reports = Connection(reports_in, writable=False)
        self._ready = select.poll()  # one syscall per tick (Connection.poll builds a selector)
        self._ready.register(reports_in, select.POLLIN)
        self.info.pid = self._process.pid
        atexit.register(_close_at_exit, weakref.ref(self))
        try:  # blocking (start-up): a spec over the pipe's buffer waits for the child to read
            data = pickle.dumps(spec)
            _write_all(records_out, SPEC_LENGTH.pack(len(data)) + data)
        except OSError:
            self._died("it did not take its start-up data")
        os.set_blocking(records_out, False)

    @property
    def alive(self) -> bool:
        return self.info.state in ("starting", "running")

    @property
    def steps(self) -> int:
        """Adaptation steps reported in the current epoch."""
        report = self.info.last_report
        return 0 if report is None else report.steps

    def wait_ready(self, timeout: float) -> bool:
        """Block until the child has loaded (or died, or ``timeout`` s passed); True if it
        runs. For tests and tools, not for the control loop."""
        deadline = time.monotonic() + timeout
        while self.info.state == "starting" and time.monotonic() < deadline:
            self._ready.poll(50)
            self.poll()
        return self.info.state == "running"

    # ----------------------------------------------------------------- control thread

    def record(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray,
               latent: np.ndarray | None) -> None:
        """Queue a transition (sent with the next :meth:`query`)."""
        if int(self._record[0]) & (TRANSITION | QUERY):
            # two transitions without a query between (send the first alone), or a query
            # not flushed yet: it belongs before this transition
            self._send()
        r, p = self._record, self._parts
        r[p["obs"]], r[p["action"]], r[p["next_obs"]] = obs, action, next_obs
        if latent is not None and self.layout.latent_dim:
            r[p["latent"]] = latent
        r[0] = int(r[0]) | TRANSITION

    def query(self, obs: np.ndarray, action: np.ndarray, latent: np.ndarray | None,
              send: bool = True) -> None:
        """Send the state the policy acted in (and the queued transition, if any); with
        ``send=False`` only queue it, for :meth:`flush` (or the next record or query) to send
        once the command is out."""
        r, p = self._record, self._parts
        if int(r[0]) & QUERY:
            self._send()  # two queries without a flush between: send the first
        r[p["query_obs"]], r[p["query_action"]] = obs, action
        if latent is not None and self.layout.latent_dim:
            r[p["query_latent"]] = latent
        r[0] = int(r[0]) | QUERY
        if send:
            self._send()

    def flush(self) -> None:
        """Send what :meth:`query` queued (nothing if nothing is queued)."""
        if int(self._record[0]) & QUERY:
            self._send()

    def reset(self) -> None:
        """Start a new epoch: the child forgets its window and adapted weights; reports of
        the previous epoch are discarded."""
        self._epoch += 1
        self._record[0] = RESET
        self._send()
        self.info.last_report = None

    def poll(self) -> AdaptationReport | None:
        """The newest report of the current epoch that arrived since the last call, else
        None. Notices a dead child (EOF)."""
        if not self.alive or not self._ready.poll(0):
            return None
        newest = None
        try:
            while self._ready.poll(0):
                report = self._reports.recv()
                self.info.reports += 1
                if report.epoch == self._epoch:
                    newest = report
        except (EOFError, OSError):
            self._died("its report pipe closed")
            return None
        self.info.state = "running"
        if newest is not None:
            self.info.last_report = newest
            self.info.last_report_wall = time.monotonic()
        return newest

    def _send(self) -> None:
        self._record[1] = self._epoch
        if self.info.state == "running":
            try:  # one write under PIPE_BUF: all of it or, if the pipe is full, nothing
                os.write(self._records, self._record.tobytes())
            except BlockingIOError:  # the child is behind: drop, never wait
                self.info.dropped_records += 1
            except OSError:
                self._died("its record pipe broke")
        self._record[0] = 0

    def _died(self, how: str) -> None:
        if not self.alive:
            return
        self.info.exit_code = self._process.poll()  # never waits: on the control thread
        self.info.state = "dead"
        code = "still exiting" if self.info.exit_code is None else \
            f"exit code {self.info.exit_code}"
        self.info.failure = f"adaptation process (pid {self.info.pid}) ended: {how}, {code}"
        _LOG.error("MAML %s; the control loop goes on with the un-adapted correction",
                   self.info.failure)

    # ----------------------------------------------------------------- any thread

    def check(self) -> None:
        """Notice a child that died without its pipe showing it yet (for a slow timer); reap
        a dead one."""
        if self.alive and self._process.poll() is not None:
            self._died("not running")
        elif self.info.state == "dead" and self.info.exit_code is None:
            self.info.exit_code = self._process.poll()

    def close(self, timeout: float = 1.0) -> None:
        """Stop the child: EOF first, then SIGTERM, then SIGKILL, each given ``timeout`` s.
        A child that ignores the first two is gone after about 2 ``timeout`` (2 s): inside a
        node's teardown bound (:data:`~metarl_ros.nodes.common.TEARDOWN_TIMEOUT_S`, 4 s),
        whose watchdog would otherwise end the node first and leave the child running."""
        if self.info.state == "closed":
            return
        self.info.state = "closed"
        os.close(self._records)
        for stop in (None, self._process.terminate, self._process.kill):
            if stop is not None:
                stop()
            try:
                self.info.exit_code = self._process.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self._reports.close()


PIPE_BYTES = 1 << 20
"""Records pipe size asked for (Linux's default maximum): 14 s of records at 100 Hz, so a
child that is slow for a while loses none (the default 64 KiB: under a second)."""


def _enlarge(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or over pipe-max-size
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_at_exit(ref: weakref.ref) -> None:
    process = ref()
    if process is not None:
        process.close(timeout=1.0)
