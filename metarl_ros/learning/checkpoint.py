"""Checkpoints: atomic writes and validated loads.

A *model file* (``model.pt``) holds what deployment needs and nothing else: network weights,
the agent spec, the env config it was trained for, the contract (joint names, rates, window),
a format version and a hash of the training config. It loads with
``torch.load(path, weights_only=True)``.

A *training checkpoint* is a directory ``<run>/checkpoints/step_<N>/`` with ``model.pt``,
``train_state.pt`` (optimizers, counters, RNG states) and optionally ``replay.npz``. It is
written under a temporary name and renamed into place, then ``<run>/checkpoints/latest`` (a
one-line file) is replaced atomically. A kill at any moment leaves either the previous complete
checkpoint or the new one -- never a half-written one. Folders get the permissions an ordinary
``mkdir`` would give them (the umask), not ``mkdtemp``'s private 0700.

Resuming (:meth:`CheckpointDirectory.load_resumable`) reads every file of the newest checkpoint
before using any of it; if one is unreadable (a disk that filled up, a copy cut short) it falls
back to the previous complete checkpoint and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from metarl_ros.core.errors import MetarlError
from metarl_ros.core.files import (
    atomic_write,
    atomic_write_text,
    make_staging_dir,
    remove_stale_temp_files,
)
from metarl_ros.core.resources import resolve_path, share_directory

MODEL_FORMAT = "metarl_ros.model"
MODEL_FORMAT_VERSION = 1


class CheckpointError(MetarlError, RuntimeError):
    """A checkpoint or model file is missing, corrupt or does not fit what uses it."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically (:func:`metarl_ros.core.files.atomic_write`)."""
    atomic_write(path, "wb", lambda stream: torch.save(obj, stream))


def build_model_payload(
    agent_state: dict[str, torch.Tensor],
    agent_spec: Any,
    train_config: dict,
    env_config_path: str,
    contract: dict,
    extra_states: dict[str, dict[str, torch.Tensor]] | None = None,
    metadata: dict | None = None,
) -> dict:
    """Everything a deployment needs, as plain tensors and primitives."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "agent_spec": asdict(agent_spec),
        "agent": agent_state,
        "extra": extra_states or {},
        "train_config": train_config,
        "config_hash": config_hash(train_config),
        "env_config": env_config_path,
        "contract": contract,
        "metadata": metadata or {},
    }


def portable_env_path(path: str | Path) -> str:
    """The env config path a model file stores: relative to the package share directory when
    the file lies inside it (``sim/envs/iiwa7_tracking.yaml``), so that a model trained in one
    checkout loads in another checkout, a pip or a colcon install; else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(share_directory().resolve()).as_posix()
    except (ValueError, FileNotFoundError):
        return str(path)


def model_env_config(payload: dict, source: str | Path) -> Path:
    """The env config file a model was trained with, found on this machine.

    A relative path (what :func:`portable_env_path` stores) resolves against the working
    directory, then the share directory. An absolute path that does not exist here (a model
    trained in another checkout) falls back to its part from the last ``sim/`` folder on,
    looked up the same way. Raises :class:`CheckpointError` naming the model and the path.
    """
    if not payload.get("env_config"):
        raise CheckpointError(f"{source}: model file names no env config")
    stored = Path(str(payload["env_config"]))
    candidates = [resolve_path(stored)]
    if stored.is_absolute() and "sim" in stored.parts:
        last_sim = len(stored.parts) - 1 - stored.parts[::-1].index("sim")
        candidates.append(resolve_path(Path(*stored.parts[last_sim:])))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{source}: the env config it was trained with, {stored}, is not on this machine "
        f"(looked for {', '.join(str(c) for c in candidates)})"
    )


def _load_failure(exc: Exception) -> str:
    """What went wrong in ``torch.load``, in one line and without torch's advice to retry
    with ``weights_only=False`` (running a file's pickled code is never the fix here)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # what the weights-only unpickler refused, e.g. "Unsupported operand 216"
        detail = text.split(marker, 1)[1].strip().splitlines()
        return ("not a PyTorch checkpoint, or corrupt (unpickling stopped: "
                f"{detail[0] if detail else 'unknown content'})")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if "weights_only" in first:
        first = "content other than tensors and plain data"
    if isinstance(exc, (EOFError, OSError, zipfile.BadZipFile)) or "zip archive" in first:
        return f"truncated or corrupt ({type(exc).__name__}: {first[:200]})"
    return f"not a readable PyTorch file ({type(exc).__name__}: {first[:200]})"


def load_torch_file(path: Path, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; :class:`CheckpointError` naming the
    file and the problem (one line) if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable {what}: {_load_failure(exc)}") from None


def load_model_payload(path: str | Path) -> dict:
    """Load and validate a model file; raises :class:`CheckpointError` with the reason."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    payload = load_torch_file(path, "model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a metarl_ros model (missing format tag)")
    if payload.get("format_version") != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model format version {payload.get('format_version')} is not supported "
            f"(this metarl_ros reads version {MODEL_FORMAT_VERSION})"
        )
    for key in ("agent_spec", "agent", "train_config", "contract"):
        if key not in payload:
            raise CheckpointError(f"{path}: model file lacks {key!r}")
    return payload


def load_state_strict(module: torch.nn.Module, state: dict, what: str, source: Path | str) -> None:
    """``load_state_dict`` with an error that names the file and the mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:4]
        raise CheckpointError(
            f"{source}: {what} weights do not fit the network: {' '.join(first)}"
        ) from None


TRAIN_STATE_KEYS = ("optimizers", "iteration", "env_steps", "updates")
"""keys every ``train_state.pt`` has (a file without them is not a training state)."""


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint whose files all read back: where it is and what it holds."""

    folder: Path
    payload: dict
    """``model.pt``, validated (:func:`load_model_payload`)."""
    state: dict
    """``train_state.pt``."""


def check_npz(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete ``.npz`` (every member
    read back and its CRC checked)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt (member {bad} fails its checksum)")


class CheckpointDirectory:
    """``<run>/checkpoints/`` with atomically published ``step_<N>`` folders."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def candidates(self) -> list[Path]:
        """Checkpoint folders to resume from, best first: the one ``latest`` points to, then
        the other ``step_<N>`` folders, newest first."""
        steps = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        pointer = self.root / "latest"
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            steps = [target] + [p for p in steps if p.name != target.name]
        return steps

    def read(self, folder: Path) -> ResumePoint:
        """Read every file of a checkpoint; :class:`CheckpointError` names the first one that
        is missing or unreadable."""
        for name in ("model.pt", "train_state.pt"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: incomplete checkpoint ({name} is missing)")
        payload = load_model_payload(folder / "model.pt")
        state = load_torch_file(folder / "train_state.pt", "training state")
        if not isinstance(state, dict) or any(key not in state for key in TRAIN_STATE_KEYS):
            raise CheckpointError(f"{folder / 'train_state.pt'}: not a training state")
        if (folder / "replay.npz").is_file():
            check_npz(folder / "replay.npz")
        return ResumePoint(folder, payload, state)

    def load_resumable(self, log: Callable[[str], Any] = print) -> ResumePoint | None:
        """The newest checkpoint that reads back completely; ``None`` if there is none at all.

        Unreadable newer checkpoints are skipped, and ``log`` gets one line naming each and the
        checkpoint resumed instead. Raises :class:`CheckpointError` listing the problems if
        checkpoints exist but none is readable.
        """
        problems = []
        for folder in self.candidates():
            try:
                point = self.read(folder)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            for problem in problems:
                log(f"skipping a damaged checkpoint: {problem}")
            if problems:
                log(f"resuming from {point.folder.name} instead, the previous complete checkpoint")
            return point
        if problems:
            raise CheckpointError(f"{self.root}: no readable checkpoint to resume from: "
                                  + "; ".join(problems))
        return None

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text().strip()
        if not (target / "model.pt").is_file() or not (target / "train_state.pt").is_file():
            raise CheckpointError(f"{pointer}: points to an incomplete checkpoint {target}")
        return target

    def save(self, step: int, files: dict[str, Any]) -> Path:
        """Write a checkpoint. ``files`` maps file names to tensors-dicts (``.pt``) or
        callables that write the file at the given path (e.g. replay ``.npz``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:09d}"
        final = self.root / name
        staging = make_staging_dir(self.root, prefix=f".{name}.")
        try:
            for file_name, content in files.items():
                target = staging / file_name
                if callable(content):
                    content(target)
                else:
                    with open(target, "wb") as stream:
                        torch.save(content, stream)
                        stream.flush()
                        os.fsync(stream.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", name + "\n")
        self._prune(keep_name=name)
        return final

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        remove_stale_temp_files(self.root, "latest")
