"""Checkpoints: atomic writes and validated loads.

A *model file* (``model.pt``) holds what deployment needs and nothing else: network weights,
the agent spec, the env config it was trained for, the contract (joint names, rates, window),
a format version and a hash of the training config. It loads with
``torch.load(path, weights_only=True)``.

A *training checkpoint* is a directory ``<run>/checkpoints/step_<N>/`` with ``model.pt``,
``train_state.pt`` (optimizers, counters, RNG states) and optionally ``replay.npz``. It is
written under a temporary name and renamed into place, then ``<run>/checkpoints/latest`` (a
one-line file) is replaced atomically. A kill at any moment leaves either the previous complete
checkpoint or the new one -- never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metarl_ros.core.errors import MetarlError
from metarl_ros.core.files import atomic_write, atomic_write_text, remove_stale_temp_files
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


def load_model_payload(path: str | Path) -> dict:
    """Load and validate a model file; raises :class:`CheckpointError` with the reason."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"{path}: not a readable model file ({type(exc).__name__}: {exc})"
        ) from None
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


class CheckpointDirectory:
    """``<run>/checkpoints/`` with atomically published ``step_<N>`` folders."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

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
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
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
