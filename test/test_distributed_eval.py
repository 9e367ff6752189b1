"""Evaluation episodes as Ray tasks: job order, errors, the same JSON as one worker to the last
digit, every Ray server on loopback, and the message without Ray.

One local Ray instance of 2 CPUs serves the module (``ray_session`` reuses an initialized
instance, so ``metarl eval`` runs on it too) and is shut down at its end.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.core.resources import share_directory
from metarl_ros.distributed.episodes import choose_backend, run_episodes_ray
from metarl_ros.distributed.runtime import RayMissingError, ray_session

MODELS = share_directory() / "models"


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray")
    with ray_session("test", num_cpus=2) as ray:
        yield ray
    assert not ray.is_initialized()


def test_tasks_come_back_in_job_order_and_a_failing_job_raises_its_error(local_ray):
    seen = []
    jobs = [-3, 1, -4, 1, -5, 9, -2]
    assert run_episodes_ray(abs, jobs, 2, lambda d, t: seen.append((d, t))) == [
        abs(x) for x in jobs]
    assert seen == [(d, 7) for d in range(1, 8)]
    assert run_episodes_ray(abs, [], 2) == []
    with pytest.raises(ValueError, match="math domain error"):
        run_episodes_ray(math.sqrt, [4.0, 1.0, -1.0, 9.0], 2)


def _listening(pids: set[int]) -> list[str]:
    """``host:port`` (hex, as in /proc/net/tcp*) of every TCP socket the processes ``pids``
    listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1])
    return found


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc")
def test_every_ray_server_listens_on_loopback_only(local_ray):
    assert local_ray.util.get_node_ip_address() == "127.0.0.1"
    run_episodes_ray(abs, [1, 2], 2)  # workers up
    listening = _listening({os.getpid(), *_descendants(os.getpid())})
    assert len(listening) >= 3  # GCS, raylet, workers, this driver
    loopback = ("0100007F:", "0000000000000000FFFF00000100007F:",
                "00000000000000000000000001000000:")
    assert [a for a in listening if not a.startswith(loopback)] == []


@pytest.mark.skipif(not (MODELS / "pearl" / "model.pt").is_file(), reason="no shipped model")
def test_metarl_eval_on_ray_writes_the_json_of_one_worker(local_ray, tmp_path):
    common = ["eval", "--model", str(MODELS), "--split", "heldout", "--episodes", "3",
              "--methods", "pearl,pd"]
    assert metarl_main([*common, "--workers", "1", "--json", str(tmp_path / "one.json")]) == 0
    assert metarl_main([*common, "--workers", "2", "--backend", "ray",
                        "--json", str(tmp_path / "ray.json")]) == 0
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "ray.json").read_bytes()


def test_without_ray_the_ray_options_say_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert choose_backend("auto", 2, None) == "process"  # works without: the process pool
    assert choose_backend("auto", 1, None) == "process"
    for backend, address in (("ray", None), ("auto", "127.0.0.1:6379")):
        with pytest.raises(RayMissingError, match=r"pip install 'metarl_ros\[distributed\]'"):
            choose_backend(backend, 2, address)
    code = metarl_main(["eval", "--model", str(MODELS), "--episodes", "1", "--address", "auto",
                        "--json", str(tmp_path / "x.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: metarl eval on Ray (--backend ray, --address) needs Ray, "
                          "which is not installed")
