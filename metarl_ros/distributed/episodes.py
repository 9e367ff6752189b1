"""The Ray backend of :func:`metarl_ros.evaluation.parallel.run_episodes`: jobs as Ray tasks.

Same contract as the process pool: ``[fn(job) for job in jobs]`` in job order, at most
``workers`` jobs running at a time, ``progress(done, total)`` after each, an exception in a
job raised here. ``fn`` travels to the workers once (``ray.put``); each worker process keeps
what ``fn`` caches between the jobs it runs, as a pool process does. Results depend on nothing
but the jobs, so they equal the single-process ones to the last digit (test_distributed_eval).

Without ``address`` the tasks run on a local Ray instance of ``workers`` CPUs on loopback;
with ``address`` on that cluster, where each task asks for one CPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from metarl_ros.core.errors import MetarlError
from metarl_ros.distributed.runtime import import_ray, ray_session

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")

FEATURE = "metarl eval on Ray (--backend ray, --address)"


def _call(fn: Callable[[Any], Any], job: Any) -> Any:
    return fn(job)


def run_episodes_ray(
    fn: Callable[[JobT], ResultT],
    jobs: Sequence[JobT],
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    address: str | None = None,
) -> list[ResultT]:
    """``[fn(job) for job in jobs]`` as Ray tasks, at most ``workers`` at once (module doc)."""
    total = len(jobs)
    workers = max(1, workers)
    out: list[Any] = [None] * total
    if total == 0:
        return out
    with ray_session(FEATURE, address=address, num_cpus=workers) as ray:
        task = ray.remote(num_cpus=1, max_retries=0)(_call)
        fn_ref = ray.put(fn)
        pending: dict[Any, int] = {}
        submitted = done = 0
        try:
            while done < total:
                while submitted < total and len(pending) < workers:
                    pending[task.remote(fn_ref, jobs[submitted])] = submitted
                    submitted += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    index = pending.pop(ref)
                    try:
                        out[index] = ray.get(ref)
                    except ray.exceptions.RayTaskError as error:
                        # the job's own exception, as inline (not Ray's wrapper and traceback)
                        cause = getattr(error, "cause", None)
                        raise (cause if isinstance(cause, Exception) else error) from None
                    done += 1
                    if progress is not None:
                        progress(done, total)
        finally:
            for ref in pending:  # a failed job: the others stop too (on a cluster as well)
                ray.cancel(ref)
    return out


def ray_backend(address: str | None = None) -> Callable[..., list]:
    """:func:`run_episodes_ray` on ``address`` (None: a local instance), as a ``backend`` of
    :func:`metarl_ros.evaluation.parallel.run_episodes`."""

    def backend(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int,
                progress: Callable[[int, int], None] | None) -> list:
        return run_episodes_ray(fn, jobs, workers, progress, address=address)

    return backend


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def choose_backend(
    backend: str, workers: int, address: str | None
) -> str | Callable[..., list]:
    """What ``metarl eval --backend B --workers N [--address A]`` runs episodes on: ``ray``
    (a function) with ``--address`` or ``--backend ray``; else ``process`` (the process pool;
    one worker runs inline). ``auto`` takes the pool on one machine: measured as fast as Ray
    or faster there, without Ray's start-up (docs/SCALING.md)."""
    if backend == "process":
        if address:
            raise MetarlError("--address runs episodes on a Ray cluster: not with --backend "
                              "process")
        return "process"
    if backend == "ray" or address:
        import_ray(FEATURE)  # one clear line if it is missing
        return ray_backend(address)
    return "process"
