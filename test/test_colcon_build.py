"""The package builds with colcon (ament_python) into the layout `ros2 run`/`ros2 launch` expect.

colcon's default (isolated) layout puts the package's prefix at `install/metarl_ros/`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = "metarl_ros"
DATA_DIRS = ("launch", "config", "models", "sim")
# Anything colcon (or setuptools under it) could leave in the source tree.
BUILD_LITTER = ("build", "install", "log")


def _colcon():
    """Return the colcon next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "colcon"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("colcon")


def _litter_snapshot():
    """Map each build artefact path in the source tree to the newest mtime inside it."""
    found = {}
    candidates = [REPO / name for name in BUILD_LITTER]
    candidates += [p for p in REPO.glob("*.egg-info")]
    candidates += [p for p in (REPO / PKG).rglob("*.egg-info")]
    for path in candidates:
        if path.exists():
            files = [path] + (list(path.rglob("*")) if path.is_dir() else [])
            found[str(path)] = max(f.lstat().st_mtime_ns for f in files)
    return found


def _source_files(folder):
    """Files under a data folder, relative to the repo, as setup.py installs them."""
    root = REPO / folder
    if not root.is_dir():
        return []
    return sorted(
        p.relative_to(REPO)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


@pytest.fixture(scope="module")
def colcon_build(tmp_path_factory):
    """Build the package once for this module; return (prefix, source litter before/after)."""
    colcon = _colcon()
    if colcon is None:
        pytest.skip("colcon is not installed (pip install colcon-common-extensions)")
    ws = tmp_path_factory.mktemp("colcon_ws")
    before = _litter_snapshot()
    cmd = [
        colcon, "--log-base", str(ws / "log"), "build",
        "--base-paths", str(REPO),
        "--build-base", str(ws / "build"),
        "--install-base", str(ws / "install"),
        "--event-handlers", "console_direct-", "console_cohesion+",
    ]
    # cwd outside the repo: nothing colcon writes relative to cwd can land in the source tree.
    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"colcon build failed:\n{proc.stdout}\n{proc.stderr}"
    after = _litter_snapshot()
    return ws / "install" / PKG, before, after


def test_ament_index_marker(colcon_build):
    prefix, _, _ = colcon_build
    assert (prefix / "share/ament_index/resource_index/packages" / PKG).is_file()


def test_package_xml_installed(colcon_build):
    prefix, _, _ = colcon_build
    assert (prefix / "share" / PKG / "package.xml").is_file()


@pytest.mark.parametrize("folder", DATA_DIRS)
def test_data_folder_installed_recursively(colcon_build, folder):
    prefix, _, _ = colcon_build
    files = _source_files(folder)
    if not files:
        pytest.skip(f"{folder}/ has no files in this checkout (git does not track empty dirs)")
    share = prefix / "share" / PKG
    assert (share / folder).is_dir()
    missing = [str(f) for f in files if not (share / f).is_file()]
    assert not missing, f"not installed under share/{PKG}/: {missing}"


def test_cli_executable_in_lib_pkg(colcon_build):
    """`ros2 run metarl_ros metarl` looks in lib/metarl_ros (setup.cfg install_scripts)."""
    prefix, _, _ = colcon_build
    exe = prefix / "lib" / PKG / "metarl"
    assert exe.is_file()
    assert os.access(exe, os.X_OK)


def test_source_tree_left_clean(colcon_build):
    _, before, after = colcon_build
    assert after == before, f"colcon build changed the source tree: {before} -> {after}"
