"""Locate the package's data folders (``config/``, ``sim/``, ``models/``, ``launch/``).

The same code runs from a source checkout (editable install), from a pip install (data files
land in ``<prefix>/share/metarl_ros``) and from a colcon install (found through the ament
index). Relative paths given by users are resolved against the working directory first and the
package share directory second, so ``--config config/train_pearl.yaml`` works from anywhere.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

PACKAGE_NAME = "metarl_ros"
_DATA_FOLDERS = ("config", "sim", "models", "launch")


def _looks_like_share(path: Path) -> bool:
    return (path / "sim").is_dir() and (path / "config").is_dir()


def _ament_share() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory
    except ImportError:
        return None
    try:
        return Path(get_package_share_directory(PACKAGE_NAME))
    except (LookupError, OSError, ValueError):  # not installed / AMENT_PREFIX_PATH unset
        return None


@lru_cache(maxsize=1)
def share_directory() -> Path:
    """Return the folder holding ``config/``, ``sim/``, ``models/`` and ``launch/``.

    Looked up in order: the source checkout this module lives in, the ament index (colcon
    install), then ``<sys.prefix>/share/metarl_ros`` (pip install).
    """
    searched = []
    for lookup in (
        lambda: Path(__file__).resolve().parents[2],
        _ament_share,
        lambda: Path(sys.prefix) / "share" / PACKAGE_NAME,
    ):
        candidate = lookup()
        if candidate is None:
            continue
        if _looks_like_share(candidate):
            return candidate
        searched.append(str(candidate))
    raise FileNotFoundError(
        f"cannot find the {PACKAGE_NAME} data folders ({', '.join(_DATA_FOLDERS)}); "
        f"searched: {', '.join(searched)}"
    )


def resolve_path(path: str | Path, base: Path | None = None) -> Path:
    """Resolve a user-given path.

    Absolute paths are returned as they are. A relative path is tried against ``base`` (the
    folder of the file that referenced it, if any), the working directory, then the share
    directory. The first that exists wins; if none exists the working-directory form is
    returned so the caller's error message names what the user typed.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    options = [] if base is None else [base / path]
    options.append(Path.cwd() / path)
    try:
        options.append(share_directory() / path)
    except FileNotFoundError:
        pass
    for option in options:
        if option.exists():
            return option
    return Path.cwd() / path
