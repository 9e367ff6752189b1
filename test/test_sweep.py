"""``metarl sweep``: Ray Tune trials of a tiny training config, the results table, resuming a
sweep whose driver was killed, and the message without Ray.

Each sweep starts a local Ray instance of 2 CPUs on loopback (and shuts it down); a trial is a
few iterations of the tiny env of test_training (1 s episodes, networks a few dozen units
wide).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from bag_helpers import write_tiny_env

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.core.errors import MetarlError
from metarl_ros.distributed.sweep import SweepSpec, parse_set, run_sweep, split_values

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="needs the [distributed] extra (Ray)")


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> Path:
    return write_tiny_env(tmp_path_factory.mktemp("tiny_env"), train_tasks=4,
                          fault_time_s=(0.3, 0.6))


def tiny_config(env: Path, folder: Path, **fields) -> Path:
    """A training YAML of the tiny setup (as test_training's tiny_config)."""
    config = dict(
        method="pearl", env=str(env), seed=3, total_iterations=2, envs_per_iteration=2,
        updates_per_iteration=5, meta_batch_tasks=2, batch_size=32, eval_tasks=2,
        eval_every_iterations=100, replay_capacity_per_task=1000, torch_threads=1,
        context_window=8,
        agent=dict(actor_hidden=[32, 32], critic_hidden=[32, 32], encoder_hidden=[32],
                   latent_dim=4),
        dynamics=dict(meta_steps_per_iteration=1, tasks_per_meta_step=2, hidden_sizes=[16],
                      support_size=10, query_size=10),
    )
    config.update(fields)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metarl_ros.cli.main", "sweep", *args]


# ------------------------------------------------------------------------------ the grid


def test_set_values_split_on_top_level_commas_only():
    assert split_values("0.001,0.01") == ["0.001", "0.01"]
    assert split_values("[64, 64],[128,128]") == ["[64, 64]", "[128,128]"]
    assert split_values("'a,b',{x: 1, y: 2}") == ["'a,b'", "{x: 1, y: 2}"]
    assert parse_set("agent.kl_weight=0.001,0.01") == ("agent.kl_weight", ("0.001", "0.01"))
    for bad in ("agent.kl_weight", "=1", "x=1,,2", "x="):
        with pytest.raises(MetarlError, match="expected dotted.key=value"):
            parse_set(bad)


def test_one_trial_per_combination_seeds_fastest():
    spec = SweepSpec("/c.yaml", (0, 1), (("agent.kl_weight", ("0.001", "0.01")),
                                         ("init_from", ("a/b.pt",))))
    trials = spec.trials()
    assert list(trials) == [
        "seed=0,agent.kl_weight=0.001,init_from=a_b.pt",
        "seed=1,agent.kl_weight=0.001,init_from=a_b.pt",
        "seed=0,agent.kl_weight=0.01,init_from=a_b.pt",
        "seed=1,agent.kl_weight=0.01,init_from=a_b.pt",
    ]
    assert trials["seed=1,agent.kl_weight=0.01,init_from=a_b.pt"] == (
        "seed=1", "agent.kl_weight=0.01", "init_from=a/b.pt")
    assert list(SweepSpec("/c.yaml").trials()) == ["config"]  # the config as it is


def test_bad_overrides_and_a_second_sweep_fail_before_ray_starts(tiny_env, tmp_path):
    config = tiny_config(tiny_env, tmp_path)
    with pytest.raises(MetarlError, match="agent.kl_wieght"):
        run_sweep(SweepSpec(str(config), (0,), (("agent.kl_wieght", ("0.1",)),)), tmp_path / "a")
    out = tmp_path / "b"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({
        "sweep": SweepSpec(str(config), (0, 1)).describe(), "trials": {}}))
    with pytest.raises(MetarlError, match="already holds a sweep; pass --resume"):
        run_sweep(SweepSpec(str(config), (0, 1)), out)
    with pytest.raises(MetarlError, match="resume with the same --config, --seeds and --set"):
        run_sweep(SweepSpec(str(config), (0, 2)), out, resume=True)


# ------------------------------------------------------------------------------ sweeps


@needs_ray
def test_a_sweep_trains_every_trial_and_writes_its_table(tiny_env, tmp_path):
    config = tiny_config(tiny_env, tmp_path)
    out = tmp_path / "sweep"
    result = subprocess.run(
        sweep_cli("--config", str(config), "--seeds", "0,1", "--set",
                  "updates_per_iteration=4", "--out", str(out)),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((out / "results.json").read_text())
    names = ["seed=0,updates_per_iteration=4", "seed=1,updates_per_iteration=4"]
    assert [row["trial"] for row in rows] == names
    for row, seed in zip(rows, ("0", "1")):
        assert row["status"] == "done" and row["seed"] == seed
        assert row["updates_per_iteration"] == "4"
        assert row["iteration"] == 2 and "eval/return" in row
        run = Path(row["run"])
        assert run == out / "runs" / row["trial"]
        # a metarl train run directory: model, checkpoints, TensorBoard, its config
        assert (run / "model.pt").is_file() and (run / "checkpoints" / "latest").is_file()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        stored = yaml.safe_load((run / "config.yaml").read_text())
        assert stored["seed"] == int(seed) and stored["updates_per_iteration"] == 4
        final = json.loads((run / "final.json").read_text())
        assert final["updates"] == 2 * 4
    assert rows[0]["eval/return"] != rows[1]["eval/return"]  # the seeds differ
    # a trial is the run metarl train makes, to the last bit
    train = tmp_path / "train"
    assert metarl_main(["train", "--config", str(config), "--seed", "0", "--set",
                        "updates_per_iteration=4", "--out", str(train), "--no-progress"]) == 0
    trained = torch.load(train / "model.pt", weights_only=True)
    swept = torch.load(Path(rows[0]["run"]) / "model.pt", weights_only=True)
    assert trained["agent"].keys() == swept["agent"].keys()
    assert all(torch.equal(trained["agent"][k], swept["agent"][k]) for k in trained["agent"])
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("trial,seed,updates_per_iteration,status,iteration")
    assert "metarl sweep" in result.stdout  # the table


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@needs_ray
def test_a_killed_sweep_resumes_without_redoing_finished_trials(tiny_env, tmp_path):
    # two trials side by side, a short and a long one; a checkpoint after every iteration
    config = tiny_config(tiny_env, tmp_path, checkpoint_every_minutes=1e-6)
    out = (tmp_path / "sweep").resolve()
    first, second = out / "runs" / "total_iterations=2", out / "runs" / "total_iterations=12"
    args = ("--config", str(config), "--set", "total_iterations=2,12", "--out", str(out))
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(sweep_cli(*args), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 400
        latest = second / "checkpoints" / "latest"
        while not ((first / "final.json").is_file() and latest.is_file()):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint of the long trial in 400 s"
            time.sleep(0.02)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        # what the driver started: Ray's agents outlive a killed driver; nothing else
        for pid in [driver.pid, *started]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.wait()
    assert not (second / "final.json").is_file(), "the long trial finished before the kill"
    killed_at = int(latest.read_text().strip().removeprefix("step_"))
    done_before = {str(p): p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    result = subprocess.run(sweep_cli(*args, "--resume"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sweep: resuming {out / 'tune'}" in result.stdout  # Tune's experiment restored
    assert f"resumed {second} at iteration {killed_at}" in result.stdout + result.stderr
    assert f"resumed {first}" not in result.stdout + result.stderr
    # the finished trial: not a file touched
    assert {str(p): p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == done_before
    rows = json.loads((out / "results.json").read_text())
    assert [(r["trial"], r["status"], r["iteration"]) for r in rows] == [
        ("total_iterations=2", "done", 2), ("total_iterations=12", "done", 12)]
    assert json.loads((second / "final.json").read_text())["updates"] == 12 * 5


# ------------------------------------------------------------------------------ without Ray


def test_without_ray_the_sweep_says_what_to_install(tiny_env, tmp_path, monkeypatch, capsys):
    config = tiny_config(tiny_env, tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = metarl_main(["sweep", "--config", str(config), "--seeds", "0,1",
                        "--out", str(tmp_path / "sweep")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: metarl sweep needs Ray, which is not installed")
    assert "pip install 'metarl_ros[distributed]'" in err
    assert not (tmp_path / "sweep").exists()
