"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, mode: str, write: Callable[[IO[Any]], Any]) -> None:
    """Write through ``write(stream)`` to a temporary file in the same folder, fsync, then
    rename over ``path``.

    The file gets the permissions an ordinary ``open(path, "w")`` would give it
    (``0o666 & ~umask``), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, "w", lambda stream: stream.write(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, "wb", lambda stream: stream.write(data))


def remove_stale_temp_files(folder: Path, name: str) -> None:
    """Delete ``.<name>.*.tmp`` files that an atomic write of ``name`` killed midway left."""
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any, allow_nan: bool = False) -> None:
    """Write ``data`` as indented JSON atomically; strict JSON (NaN/inf refused) by default."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")


def make_staging_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new folder ``<parent>/<prefix><pid>-<random><suffix>`` to build an output in before
    renaming it into place.

    It gets the permissions an ordinary ``mkdir`` would give it (``0o777 & ~umask``), not
    ``mkdtemp``'s private 0700, and carries the creating process's id so that
    :func:`remove_stale_staging_dirs` can tell a killed run's leftovers from a running one's.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_staging_dirs(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Delete ``<prefix>*<suffix>`` folders in ``parent`` left by killed runs (made by
    :func:`make_staging_dir` in a process that no longer exists, or without a process id);
    another running process's folder is left alone. Returns the folders removed."""
    removed = []
    for path in Path(parent).glob(f"{prefix}*{suffix}"):
        if not path.is_dir():
            continue
        middle = path.name[len(prefix):len(path.name) - len(suffix)]
        pid_text, dash, _ = middle.partition("-")
        if dash and pid_text.isdigit() and _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
