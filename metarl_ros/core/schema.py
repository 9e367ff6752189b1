"""Validated YAML configuration.

Every YAML file the project reads goes through :func:`load_yaml_model`, which validates it
against a pydantic model. A bad file (missing, not YAML, unknown key, wrong type, value out of
range) raises :class:`ConfigError` whose message names the file and the offending field, e.g.::

    ConfigError: sim/robots/iiwa7.yaml: effort_limits.3: Input should be greater than 0
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from metarl_ros.core.errors import MetarlError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(MetarlError, ValueError):
    """A configuration file is missing, malformed or invalid."""


class StrictModel(BaseModel):
    """Base for all config models: unknown keys are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ANY_VALUE = object()
"""A retired option's value in :func:`drop_retired` when any value did nothing (the option
only mattered together with another retired one)."""


def drop_retired(data: Mapping[str, Any], retired: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (nested mappings, e.g. a stored config) without the removed options of
    ``retired``: dotted key (``agent.kl_weight``) -> the value with which the option did
    nothing, i.e. what the code does now, or :data:`ANY_VALUE`. Data that holds an option at
    another value describes something this version cannot do: ``ValueError`` naming it.
    ``data`` is not modified."""
    result = dict(data)
    for dotted, neutral in retired.items():
        *parents, leaf = dotted.split(".")
        node = result
        for part in parents:
            child = node.get(part)
            if not isinstance(child, Mapping):
                break
            node[part] = dict(child)
            node = node[part]
        else:
            if leaf in node:
                value = node.pop(leaf)
                if neutral is not ANY_VALUE and value != neutral:
                    raise ValueError(
                        f"{dotted}: {value!r}: this option was removed (it only remains "
                        f"as {neutral!r}, what the code does now)"
                    )
    return result


def format_validation_error(source: str, error: ValidationError) -> str:
    """Render a pydantic error as ``source: field.path: message`` lines."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"{source}: {location}: {item['msg']}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, raising :class:`ConfigError` naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
                          f"{line}); a YAML config must be UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def validate_model(model_type: type[ModelT], data: Any, source: str) -> ModelT:
    """Validate already-parsed data against ``model_type``; ``source`` names it in errors."""
    if data is None:
        raise ConfigError(f"{source}: file is empty")
    try:
        return model_type.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_yaml_model(model_type: type[ModelT], path: str | Path) -> ModelT:
    """Load ``path`` and validate it as ``model_type``."""
    return validate_model(model_type, read_yaml(path), str(path))
