"""Episodes in parallel behind one small interface: :func:`run_episodes`.

``run_episodes(fn, jobs, workers)`` returns ``[fn(job) for job in jobs]``, in job order,
computed by ``workers`` processes. ``fn`` must be a module-level function and every job
picklable (plain data and paths: each worker loads what a job names itself and may cache it).
Results do not depend on ``workers`` as long as ``fn(job)`` depends on nothing but ``job``:
``metarl eval`` writes the same JSON with 1 worker and with 8.

Backend: the standard library's process pool, with the *spawn* start method (a fresh
interpreter per worker: no state inherited from the parent, no fork of a process that holds
OpenMP or PyBullet threads). ``workers <= 1`` runs the jobs inline in this process. Another
backend plugs in behind the same signature: ``backend`` may be a function
``(fn, jobs, workers, progress) -> results`` (the Ray one,
:func:`metarl_ros.distributed.episodes.ray_backend`, which the CLI passes: this layer does not
import Ray).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")
Progress = Callable[[int, int], None]
"""``progress(done, total)`` after each finished job."""

BACKENDS = ("process",)
Backend = Callable[[Callable[[Any], Any], Sequence[Any], int, "Progress | None"], list]
"""An implementation of :func:`run_episodes` elsewhere (``backend=``)."""


def _worker_init() -> None:
    # one thread per worker: the workers are the parallelism (and results stay exact)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_episodes(
    fn: Callable[[JobT], ResultT],
    jobs: Sequence[JobT],
    workers: int = 1,
    progress: Progress | None = None,
    backend: str | Backend = "process",
) -> list[ResultT]:
    """``[fn(job) for job in jobs]`` on ``workers`` processes (module doc).

    Jobs are submitted in the given order (put the longest first for a balanced finish).
    An exception in a job propagates, as it would inline.
    """
    if callable(backend):
        return backend(fn, jobs, workers, progress)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    total = len(jobs)
    if workers <= 1 or total <= 1:
        results = []
        for done, job in enumerate(jobs, start=1):
            results.append(fn(job))
            if progress is not None:
                progress(done, total)
        return results
    context = multiprocessing.get_context("spawn")
    out: list = [None] * total
    with ProcessPoolExecutor(
        max_workers=min(workers, total), mp_context=context, initializer=_worker_init
    ) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), start=1):
            out[futures[future]] = future.result()
            if progress is not None:
                progress(done, total)
    return out
