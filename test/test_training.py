"""Training, checkpoint / resume, model files and ``metarl eval``, on a tiny setup.

The env is the shipped iiwa7 tracking env with 1 s episodes and a task suite with small
splits (4 train / 3 held-out tasks, the fault at 0.3..0.6 s), written to a temp folder; the
networks are a few dozen units wide. The whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bag_helpers import write_tiny_env

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.core.resources import share_directory
from metarl_ros.evaluation.evaluate import (
    RECOVERY_FLOOR_RAD,
    action_oscillation,
    bootstrap_normalized_return,
    context_window,
    load_method_models,
    recovery_times,
    rolling_mean,
)
from metarl_ros.learning.checkpoint import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    CheckpointError,
    load_model_payload,
    model_env_config,
    portable_env_path,
)
from metarl_ros.learning.config import (
    AgentConfig,
    DynamicsConfig,
    TrainConfig,
    config_changes,
    load_train_config,
)
from metarl_ros.learning.encoder import make_transition
from metarl_ros.learning.saved_model import load_model
from metarl_ros.learning.torque_model import TorqueGainDynamics
from metarl_ros.learning.trainer import Trainer
from metarl_ros.policy.dynamics_adaptation import DynamicsAdaptation
from metarl_ros.sim.tasks import nominal_task

torch.set_num_threads(1)

TRAIN_TASKS = 4


# ------------------------------------------------------------------------------------------
# tiny env, configs and runs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> Path:
    """An env YAML: the shipped one with 1 s episodes and small task splits."""
    return write_tiny_env(
        tmp_path_factory.mktemp("tiny_env"), train_tasks=TRAIN_TASKS, fault_time_s=(0.3, 0.6)
    )


def tiny_config(env: Path, method: str = "pearl", **overrides) -> TrainConfig:
    agent = overrides.pop("agent", {})
    fields = dict(
        method=method, env=str(env), seed=3, total_iterations=4, envs_per_iteration=2,
        updates_per_iteration=10, meta_batch_tasks=2, batch_size=32, eval_tasks=2,
        eval_every_iterations=100, replay_capacity_per_task=1000, initial_episodes_per_task=1,
        torch_threads=1, context_window=8,
        agent=AgentConfig(actor_hidden=[32, 32], critic_hidden=[32, 32], encoder_hidden=[32],
                          latent_dim=4, **agent),
        dynamics=DynamicsConfig(meta_steps_per_iteration=1, tasks_per_meta_step=2,
                                hidden_sizes=[16], support_size=10, query_size=10),
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def write_config(config: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert load_train_config(path) == config
    return path


def agent_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"agent.{k}": v.clone() for k, v in trainer.agent.state_dict().items()}
    for name, model in trainer.dynamics.items():
        state.update({f"{name}.{k}": v.clone() for k, v in model.state_dict().items()})
    return state


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def assert_nested_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_nested_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def trained_run(tiny_env, tmp_path_factory) -> tuple[Path, Path, TrainConfig]:
    """A PEARL run trained 2 iterations (checkpointed), its config YAML and config."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(tiny_env)
    config_path = write_config(config, root / "train.yaml")
    trainer = Trainer(config, root / "run", config_path=config_path, progress=False)
    trainer.run(max_iterations=2)
    return root / "run", config_path, config


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def test_short_training_lowers_critic_loss_and_runs_end_to_end(tiny_env, tmp_path):
    config = tiny_config(tiny_env, agent={"gamma": 0.9}, updates_per_iteration=20)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert len(trainer.tasks) == TRAIN_TASKS
    trainer.collect_initial()
    steps = trainer.setup.episode_steps
    assert steps == 100
    assert len(trainer.replay) == TRAIN_TASKS * steps == trainer.env_steps
    losses = [trainer.update()["critic_loss"] for _ in range(300)]
    assert trainer.updates == 300
    assert all(np.isfinite(losses))
    first, last = float(np.mean(losses[:30])), float(np.mean(losses[-30:]))
    assert last < 0.5 * first, (first, last)

    stats = trainer.run(max_iterations=2)
    assert trainer.iteration == 2
    assert trainer.updates == 300 + 2 * 20
    assert trainer.env_steps == (TRAIN_TASKS + 2 * 2) * steps
    for key in ("critic_loss", "actor_loss", "kl", "train/return", "eval/return",
                "eval/tracking_error_after", "dynamics_latent/post_adapt_loss"):
        assert np.isfinite(stats[key]), key
    assert (tmp_path / "run" / "checkpoints" / "step_000000002" / "replay.npz").is_file()
    loaded = load_model(tmp_path / "run" / "model.pt")
    assert loaded.method == "pearl"
    assert set(loaded.dynamics) == {"dynamics_latent", "dynamics_plain"}
    assert_states_equal({k: v for k, v in loaded.agent.state_dict().items()},
                        dict(trainer.agent.state_dict()))
    assert loaded.payload["metadata"]["iteration"] == 2


def test_checkpoint_resume_restores_everything_and_continues_identically(tiny_env, tmp_path):
    """Train 2 iterations (checkpoint), keep going 1 more; a fresh trainer resumed from the
    checkpoint has the same state and its next iteration gives the same weights exactly."""
    config = tiny_config(tiny_env)
    original = Trainer(config, tmp_path / "original", progress=False)
    original.run(max_iterations=2)  # ends with a checkpoint at iteration 2
    at_checkpoint = agent_state(original)
    state_at_checkpoint = copy.deepcopy(original.train_state())  # optimizer tensors are live
    replay_at_checkpoint = [(t.size, t.cursor, t.obs.copy(), t.action.copy(), t.reward.copy(),
                             t.next_obs.copy(), t.episode_step.copy())
                            for t in original.replay.tasks]
    shutil.copytree(tmp_path / "original", tmp_path / "resumed")
    original.run(max_iterations=1)

    torch.manual_seed(12345)  # a fresh process has some other global RNG state
    resumed = Trainer(config, tmp_path / "resumed", progress=False)
    fresh = agent_state(resumed)
    assert resumed.resume()
    restored = agent_state(resumed)
    assert any(not torch.equal(fresh[k], restored[k]) for k in fresh)  # weights were loaded
    assert (resumed.iteration, resumed.env_steps, resumed.updates) == (
        2, (TRAIN_TASKS + 2 * 2) * 100, 2 * 10)
    assert resumed.normalizer_fitted
    assert_states_equal(restored, at_checkpoint)
    assert_nested_equal(resumed.train_state(), state_at_checkpoint)  # optimizers, RNG states
    for buffer, (size, cursor, obs, action, reward, next_obs, episode_step) in zip(
            resumed.replay.tasks, replay_at_checkpoint):
        assert (buffer.size, buffer.cursor) == (size, cursor)
        for mine, theirs in ((buffer.obs, obs), (buffer.action, action),
                             (buffer.reward, reward), (buffer.next_obs, next_obs),
                             (buffer.episode_step, episode_step)):
            np.testing.assert_array_equal(mine[:size], theirs[:size])

    resumed.run(max_iterations=1)
    assert (resumed.iteration, resumed.updates, resumed.env_steps) == (
        original.iteration, original.updates, original.env_steps) == (
        3, 30, (TRAIN_TASKS + 3 * 2) * 100)
    assert_states_equal(agent_state(resumed), agent_state(original))
    assert_nested_equal(resumed.train_state(), original.train_state())


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl_ros.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_metarl_train_survives_sigkill_and_resumes(tiny_env, tmp_path):
    config = tiny_config(tiny_env, total_iterations=10_000, updates_per_iteration=5,
                         checkpoint_every_minutes=1e-6)  # a checkpoint after every iteration
    config_path = write_config(config, tmp_path / "train.yaml")
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest"
    process = subprocess.Popen(
        [sys.executable, "-m", "metarl_ros.cli.main", "train", "--config", str(config_path),
         "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # wait for the second checkpoint, so that pruning has run once as well
        while not (latest.is_file() and latest.read_text().strip() >= "step_000000002"):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    step_name = latest.read_text().strip()
    killed_at = int(step_name.removeprefix("step_"))
    assert killed_at >= 2
    killed_model = load_model_payload(out / "checkpoints" / step_name / "model.pt")
    assert killed_model["metadata"]["iteration"] == killed_at
    # what a kill in the middle of writing leaves behind (checkpoint staging folder, temp
    # files of the atomic 'latest' pointer and model.pt): resuming must clean it up
    (out / "checkpoints" / f".step_{killed_at + 1:09d}.x1y2z3").mkdir()
    (out / "checkpoints" / f".step_{killed_at + 1:09d}.x1y2z3" / "model.pt").write_bytes(b"half")
    (out / "checkpoints" / ".latest.abc123.tmp").write_text("step_")
    (out / ".model.pt.def456.tmp").write_bytes(b"half")

    result = run_cli("train", "--config", str(config_path), "--out", str(out), "--resume",
                     "--iterations", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    match = re.search(r"resumed .* at iteration (\d+)", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == killed_at
    done = re.search(r"done: iteration (\d+)", result.stdout)
    assert done and int(done.group(1)) == killed_at + 2, result.stdout
    final = load_model_payload(out / "model.pt")
    assert final["metadata"]["iteration"] == killed_at + 2
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{killed_at + 2:09d}"
    leftovers = [p for p in out.rglob("*")
                 if p.name.startswith(".step_") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(kept) <= 2 and kept[-1] == f"step_{killed_at + 2:09d}"


def test_metarl_train_refuses_existing_run_and_config_mismatch(trained_run, tmp_path, capsys):
    run, config_path, config = trained_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    code = metarl_main(["train", "--config", str(config_path), "--out", str(out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "already holds a run" in err

    other = write_config(config.model_copy(update={"seed": config.seed + 1}),
                         tmp_path / "other.yaml")
    code = metarl_main(["train", "--config", str(other), "--out", str(out), "--resume",
                        "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different config" in err and "step_000000002" in err
    assert f"seed: {config.seed} -> {config.seed + 1}" in err  # names what changed
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing  # nothing written


def test_config_changes_ignore_fields_added_since_at_their_defaults(tiny_env):
    config = tiny_config(tiny_env, method="pearl")
    stored = config.model_dump(mode="json")
    assert config_changes(stored, config) == []
    # a run written before two options existed: the same run under their defaults
    del stored["init_critic_condition"], stored["agent"]["task_inference_weight"]
    assert config_changes(stored, config) == []
    stored["agent"]["kl_weight"] = config.agent.kl_weight * 2
    assert config_changes(stored, config) == [
        f"agent.kl_weight: {config.agent.kl_weight * 2!r} -> {config.agent.kl_weight!r}"]
    stored["no_such_option"] = 1
    (change,) = config_changes(stored, config)
    assert change.startswith("stored config no longer valid") and "no_such_option" in change


# ------------------------------------------------------------------------------------------
# model files
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tiny_env, tmp_path_factory) -> Path:
    """Untrained but saved models for every method: ``<dir>/<method>/model.pt``."""
    root = tmp_path_factory.mktemp("models")
    for method in ("oracle", "robust", "nominal", "pearl"):
        trainer = Trainer(tiny_config(tiny_env, method=method), root / method, progress=False)
        assert trainer.write_final_model() == root / method / "model.pt"
    return root


def expect_checkpoint_error(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_valid_model_loads_with_weights_only(model_dir):
    path = model_dir / "pearl" / "model.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == MODEL_FORMAT and payload["format_version"] == MODEL_FORMAT_VERSION
    loaded = load_model(path)
    assert loaded.method == "pearl" and loaded.agent.encoder is not None
    assert_states_equal(dict(loaded.agent.state_dict()), payload["agent"])
    assert load_model(model_dir / "oracle").agent.spec.conditioning == "oracle"  # a directory


def test_corrupt_and_foreign_model_files_raise_checkpoint_error(model_dir, tmp_path):
    good = model_dir / "pearl" / "model.pt"
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    expect_checkpoint_error(truncated, "not a readable model file")

    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_checkpoint_error(noise, "not a readable model file")

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expect_checkpoint_error(empty, "not a readable model file")

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    expect_checkpoint_error(foreign, "not a metarl_ros model")
    torch.save([torch.zeros(2)], foreign)
    expect_checkpoint_error(foreign, "not a metarl_ros model")

    payload = torch.load(good, weights_only=True)
    future = tmp_path / "future.pt"
    torch.save({**payload, "format_version": MODEL_FORMAT_VERSION + 1}, future)
    expect_checkpoint_error(future, f"format version {MODEL_FORMAT_VERSION + 1}", "not supported")

    lacking = tmp_path / "lacking.pt"
    torch.save({k: v for k, v in payload.items() if k != "contract"}, lacking)
    expect_checkpoint_error(lacking, "'contract'")

    tampered = copy.deepcopy(payload)
    key = "actor.head.weight"
    shape = tuple(tampered["agent"][key].shape)
    tampered["agent"][key] = torch.zeros(shape[0] + 1, shape[1])
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save(tampered, wrong_shape)
    expect_checkpoint_error(wrong_shape, "agent weights do not fit", key)

    tampered = copy.deepcopy(payload)
    del tampered["agent"]["critic.net.layers.0.weight"]
    missing = tmp_path / "missing_key.pt"
    torch.save(tampered, missing)
    expect_checkpoint_error(missing, "agent weights do not fit", "critic.net.layers.0.weight")

    tampered = copy.deepcopy(payload)
    name = "dynamics_latent"
    first = next(iter(tampered["extra"][name]))
    tampered["extra"][name][first] = torch.zeros(1)
    bad_dynamics = tmp_path / "bad_dynamics.pt"
    torch.save(tampered, bad_dynamics)
    expect_checkpoint_error(bad_dynamics, f"{name} weights do not fit")

    expect_checkpoint_error(tmp_path / "nowhere.pt", "not found")
    expect_checkpoint_error(tmp_path, "not found")  # a directory without model.pt
    assert torch.load(good, weights_only=True)["format"] == MODEL_FORMAT  # untouched


def test_model_env_config_is_found_from_another_checkout(tmp_path):
    shipped_env = share_directory() / "sim" / "envs" / "iiwa7_tracking.yaml"
    # trained inside the package: stored relative to it, so any checkout or install finds it
    assert portable_env_path(shipped_env) == "sim/envs/iiwa7_tracking.yaml"
    relative = {"env_config": portable_env_path(shipped_env)}
    assert model_env_config(relative, "m.pt").resolve() == shipped_env.resolve()
    # trained in another checkout (an absolute path that does not exist here): its sim/ tail
    foreign = {"env_config": "/elsewhere/checkout/sim/envs/iiwa7_tracking.yaml"}
    assert model_env_config(foreign, "m.pt").resolve() == shipped_env.resolve()
    # an env config outside the package stays absolute and is used as it is
    own = tmp_path / "my_env.yaml"
    own.write_text(shipped_env.read_text())
    assert portable_env_path(own) == str(own.resolve())
    assert model_env_config({"env_config": str(own)}, "m.pt") == own.resolve()
    for missing in ("/elsewhere/sim/envs/no_such_env.yaml", str(tmp_path / "gone.yaml"), ""):
        with pytest.raises(CheckpointError, match="m.pt: ") as info:
            model_env_config({"env_config": missing}, "m.pt")
        assert missing in str(info.value) or "names no env config" in str(info.value)


def test_checkpoint_dir_with_dangling_latest_pointer(trained_run, tmp_path):
    run, _, config = trained_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "checkpoints" / "latest").write_text("step_000000777\n")
    trainer = Trainer(config, out, progress=False)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        trainer.resume()


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------

METHOD_KEYS = ("normalized_return", "recover_time_s_mean", "recover_time_s_std",
               "recovered_fraction", "tracking_error_before_mean", "tracking_error_before_std",
               "tracking_error_after_mean", "tracking_error_after_std", "action_oscillation")


def test_eval_runs_pearl_with_its_own_context_window(model_dir, tiny_env, tmp_path):
    # the nominal model (loaded first) was trained with another window than PEARL's
    for method in ("oracle", "robust", "pearl"):
        shutil.copytree(model_dir / method, tmp_path / method)
    nominal = Trainer(tiny_config(tiny_env, method="nominal", context_window=3),
                      tmp_path / "nominal", progress=False)
    nominal.write_final_model()
    models = load_method_models(tmp_path, ("pearl", "robust"))
    assert next(iter(models)) == "nominal" and models["nominal"].contract.window_size == 3
    assert context_window(models) == models["pearl"].contract.window_size == 8
    assert context_window(load_method_models(tmp_path, ("robust",))) == 1


@pytest.mark.filterwarnings("ignore:No artists with labels")  # 1 s episodes: no window to plot
def test_metarl_eval_writes_documented_json_and_plot(model_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "eval" / "out.json", tmp_path / "eval" / "out.png"
    code = metarl_main(["eval", "--model", str(model_dir), "--split", "heldout", "--episodes", "2",
                        "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out_json.read_text())
    assert set(result) == {"oracle", "robust", "nominal", "pearl", "maml", "pearl_maml",
                           "protocol"}
    for method in ("oracle", "robust", "nominal", "pearl", "maml", "pearl_maml"):
        metrics = result[method]
        for key in METHOD_KEYS:
            assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), (method, key)
        assert 0.0 <= metrics["recovered_fraction"] <= 1.0
        assert metrics["recover_time_s_mean"] >= 0.0 and metrics["tracking_error_after_mean"] > 0.0
    assert result["oracle"]["normalized_return"] == 1.0
    assert result["nominal"]["normalized_return"] == 0.0
    assert result["oracle"]["normalized_return_ci95"] == [1.0, 1.0]
    assert result["nominal"]["normalized_return_ci95"] == [0.0, 0.0]
    assert result["oracle"]["recover_time_s_mean"] == 0.0  # the oracle is its own reference
    assert result["oracle"]["recovered_fraction"] == 1.0
    # what the MAML correction adds, paired with the same policy without it
    for method, base in (("maml", "robust"), ("pearl_maml", "pearl")):
        gain = result[method]["post_fault_gain_vs_base"]
        assert gain["base"] == base and gain["sem"] >= 0.0
        expected = (
            result[method]["post_fault_return_sum"] - result[base]["post_fault_return_sum"]
        ) / 2
        assert gain["mean"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert "post_fault_gain_vs_base" not in result["pearl"]
    protocol = result["protocol"]
    assert protocol["split"] == "heldout" and protocol["episodes"] == 2
    assert protocol["control_dt"] == pytest.approx(0.01)
    assert not list(out_json.parent.glob("*.tmp"))
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib import image

    assert image.imread(out_png).ndim == 3


def test_metarl_eval_reports_missing_or_mislabelled_models(model_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shutil.rmtree(partial / "nominal")
    code = metarl_main(["eval", "--model", str(partial), "--episodes", "1", "--json",
                        str(tmp_path / "x.json")])
    assert code == 2
    assert "nominal" in capsys.readouterr().err
    shutil.copytree(model_dir / "robust", partial / "nominal")  # a robust model under nominal/
    code = metarl_main(["eval", "--model", str(partial), "--episodes", "1", "--json",
                        str(tmp_path / "x.json")])
    assert code == 2
    assert "expected 'nominal'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_maml_method_alone_loads_the_pearl_run_that_owns_its_dynamics(model_dir, tmp_path):
    models = load_method_models(model_dir, ["maml"])
    assert set(models) == {"oracle", "nominal", "robust", "pearl"}
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shutil.rmtree(partial / "pearl")
    with pytest.raises(CheckpointError, match=r"pearl/model.pt: missing; method\(s\) \['maml'\]"):
        load_method_models(partial, ["oracle", "maml"])
    assert set(load_method_models(partial, ["robust"])) == {"oracle", "nominal", "robust"}


# ------------------------------------------------------------------------------------------
# evaluation metrics on hand-made arrays
# ------------------------------------------------------------------------------------------


def naive_rolling_mean(x: np.ndarray, width: int) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for t in range(x.shape[-1]):
        out[..., t] = x[..., max(0, t - width + 1):t + 1].mean(-1)
    return out


@pytest.mark.parametrize("width", [1, 3, 4, 17, 40])
def test_rolling_mean(width):
    x = np.random.default_rng(width).normal(size=(3, 17))
    np.testing.assert_allclose(rolling_mean(x, width), naive_rolling_mean(x, width),
                               rtol=1e-12, atol=1e-12)


def test_action_oscillation_is_the_amplitude_of_step_to_step_alternation():
    steps = np.arange(40)
    alternating = 0.3 * (-1.0) ** steps  # period 2, amplitude 0.3
    ramp = np.linspace(-1.0, 1.0, 40)  # smooth: no second difference
    action = np.stack([np.stack([alternating, ramp], -1), np.stack([ramp, ramp], -1)])
    np.testing.assert_allclose(action_oscillation(action), [0.15, 0.0], atol=1e-12)
    slow = np.sin(2 * np.pi * steps / 20)[None, :, None]  # a 20-step period barely counts
    # its second difference is 4 sin(pi / 20)^2 ~ 0.1 of its amplitude: 0.016 against 0.3
    assert action_oscillation(slow)[0] < 0.1 * action_oscillation(alternating[None, :, None])[0]


def test_rolling_mean_simple_values():
    np.testing.assert_allclose(rolling_mean(np.array([2.0, 4.0, 6.0, 8.0]), 2),
                               [2.0, 3.0, 5.0, 7.0])
    x = np.arange(6.0)
    np.testing.assert_array_equal(rolling_mean(x, 1), x)


def test_bootstrap_interval_of_the_normalized_return():
    rng = np.random.default_rng(0)
    nominal = rng.normal(-100.0, 30.0, 400)
    oracle = nominal + rng.normal(10.0, 5.0, 400)  # the gap varies per episode
    halfway = nominal + 0.5 * (oracle - nominal)
    low, high = bootstrap_normalized_return(halfway, oracle, nominal)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)  # exact in every resample
    noisy = halfway + rng.normal(0.0, 10.0, 400)
    low, high = bootstrap_normalized_return(noisy, oracle, nominal)
    point = (noisy - nominal).sum() / (oracle - nominal).sum()
    assert low < point < high and low < 0.5 < high
    few_low, few_high = bootstrap_normalized_return(
        noisy[:50], oracle[:50], nominal[:50]
    )
    assert few_high - few_low > 2 * (high - low)  # ~sqrt(8) wider with 8x fewer episodes


def test_recovery_times_without_rolling():
    dt = 0.25  # the 0.25 s rolling window is a single step: raw errors are compared
    steps, fault = 20, 5
    oracle = np.full((5, steps), 0.1)
    error = oracle.copy()            # row 0: identical to the oracle -> 0 s
    error[1, fault:fault + 3] = 1.0  # row 1: recovers after 3 steps -> 0.75 s
    error[2, fault:] = 1.0           # row 2: never recovers -> remaining time, not recovered
    error[3, :fault] = 5.0           # row 3: bad only before the fault: irrelevant -> 0 s
    error[3, fault:] = 0.1 * 1.10 + RECOVERY_FLOOR_RAD - 1e-9  # within bounds
    error[4, fault + 1] = error[4, fault + 6] = 0.5  # row 4: relapses; last bad step counts
    times, recovered = recovery_times(error, oracle, [fault] * 5, dt)
    np.testing.assert_allclose(times, [0.0, 3 * dt, (steps - fault) * dt, 0.0, 7 * dt])
    assert recovered.tolist() == [True, True, False, True, True]
    # per-episode fault steps
    times, recovered = recovery_times(error[1:3], oracle[1:3], [fault, 15], dt)
    np.testing.assert_allclose(times, [3 * dt, (steps - 15) * dt])
    assert recovered.tolist() == [True, False]


def test_recovery_times_with_rolling_window():
    dt = 0.01  # 0.25 s = 25 steps of rolling mean
    steps, fault, k = 200, 50, 30
    oracle = np.full((1, steps), 0.05)
    error = oracle.copy()
    error[0, fault:fault + k] = 2.0  # bad for k steps after the fault, then like the oracle
    times, recovered = recovery_times(error, oracle, [fault], dt)
    # the trailing mean still holds a bad step until 24 steps after the last one
    assert times[0] == pytest.approx((k + 24) * dt)
    assert recovered.tolist() == [True]


# ------------------------------------------------------------------------------------------
# intact-robot share, critic warm-up, structured MAML dynamics
# ------------------------------------------------------------------------------------------


def test_intact_fraction_replaces_task_slots_by_the_intact_robot(tiny_env, tmp_path):
    config = tiny_config(tiny_env, method="robust", intact_fraction=0.5)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    intact = trainer.intact_task
    joints = trainer.setup.robot.num_joints
    assert intact is not None and trainer.tasks[intact].key() == nominal_task(joints).key()
    ids = [i for _ in range(400) for i in trainer.sample_task_ids(2)]
    share = ids.count(intact) / len(ids)
    uniform = 1 / len(trainer.tasks)  # what the intact robot gets without the option
    expected = 0.5 + 0.5 * uniform
    assert abs(share - expected) < 0.05, share
    plain = Trainer(tiny_config(tiny_env, method="robust"), tmp_path / "plain", progress=False)
    ids = [i for _ in range(400) for i in plain.sample_task_ids(2)]
    assert abs(ids.count(intact) / len(ids) - uniform) < 0.05


def test_critic_warmup_keeps_the_actor_for_its_updates(tiny_env, tmp_path):
    config = tiny_config(tiny_env, method="robust", critic_warmup_updates=15)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.collect_initial()
    actor = {k: v.clone() for k, v in trainer.agent.actor.state_dict().items()}
    for _ in range(15):
        trainer.update()
    assert all(torch.equal(trainer.agent.actor.state_dict()[k], v) for k, v in actor.items())
    trainer.update()
    assert any(not torch.equal(trainer.agent.actor.state_dict()[k], v) for k, v in actor.items())


def test_torque_gain_dynamics_train_save_load_and_correct(tiny_env, tmp_path):
    """A PEARL run with the structured MAML model: the model file round-trips and the online
    adaptation runs with it."""
    dynamics = DynamicsConfig(
        model="torque_gain", meta_steps_per_iteration=2, tasks_per_meta_step=2,
        hidden_sizes=[16], support_size=10, query_size=10,
    )
    trainer = Trainer(tiny_config(tiny_env, dynamics=dynamics), tmp_path / "run", progress=False)
    trainer.run(max_iterations=2)
    loaded = load_model(tmp_path / "run" / "model.pt")
    model = loaded.dynamics["dynamics_latent"]
    assert isinstance(model, TorqueGainDynamics)
    assert_states_equal(
        {k: v for k, v in model.state_dict().items()},
        {k: v for k, v in trainer.dynamics["dynamics_latent"].state_dict().items()},
    )
    adaptation = DynamicsAdaptation(model, loaded.maml_config, window=20, adapt_every=5)
    setup = trainer.setup
    obs = np.zeros(setup.obs_dim, np.float32)
    for _ in range(30):
        out = adaptation.apply(obs, np.zeros(setup.act_dim, np.float32), np.zeros(4, np.float32))
        adaptation.record(obs, out, obs, np.zeros(4, np.float32))
        adaptation.maybe_step()
    assert adaptation.steps == 6 and adaptation.last_result is not None


def test_anchor_weight_needs_init_from_and_anchors_to_the_source(tiny_env, tmp_path):
    with pytest.raises(ValueError, match="anchor_weight > 0 needs init_from"):
        tiny_config(tiny_env, method="robust", anchor_weight=1.0)
    nominal = Trainer(tiny_config(tiny_env, method="nominal"), tmp_path / "nominal",
                      progress=False)
    source = nominal.write_final_model()
    config = tiny_config(tiny_env, method="pearl", init_from=str(source), anchor_weight=1.0)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    obs = torch.randn(16, trainer.spec.obs_dim)
    with torch.no_grad():
        expected = nominal.agent.actor(obs)
        z = torch.randn(16, trainer.spec.latent_dim)
        torch.testing.assert_close(trainer.anchor_actor(torch.cat([obs, z], -1)), expected)
    trainer.collect_initial()
    losses = [trainer.update()["anchor_loss"] for _ in range(5)]
    assert losses[0] == 0.0 and losses[-1] > 0.0
    assert not any(p.requires_grad for p in trainer.anchor_actor.parameters())
    # resume rebuilds the anchor from init_from, not from the fine-tuned actor
    trainer.save_checkpoint()
    resumed = Trainer(config, tmp_path / "run", progress=False)
    assert resumed.resume()
    with torch.no_grad():
        torch.testing.assert_close(resumed.anchor_actor(torch.cat([obs, z], -1)), expected)


def test_init_critic_condition_reaches_the_warm_start(tiny_env, tmp_path):
    with pytest.raises(ValueError, match="init_critic_condition 'random' needs init_from"):
        tiny_config(tiny_env, method="pearl", init_critic_condition="random")
    source = Trainer(tiny_config(tiny_env, method="nominal"), tmp_path / "nominal",
                     progress=False).write_final_model()
    columns = {}
    for init in ("zero", "random"):
        config = tiny_config(tiny_env, method="pearl", init_from=str(source),
                             init_critic_condition=init)
        trainer = Trainer(config, tmp_path / init, progress=False)
        obs_dim, latent_dim = trainer.spec.obs_dim, trainer.spec.latent_dim
        first = trainer.agent.critic.net.layers[0].weight  # (2, obs + z + act, hidden)
        columns[init] = first[:, obs_dim : obs_dim + latent_dim]
        assert torch.count_nonzero(trainer.agent.actor.trunk[0].weight[:, obs_dim:]) == 0
    assert torch.count_nonzero(columns["zero"]) == 0
    assert torch.count_nonzero(columns["random"]) == columns["random"].numel()


def test_smoothness_weight_reaches_the_actor_update(tiny_env, tmp_path):
    with pytest.raises(ValueError, match="smoothness_weight"):
        tiny_config(tiny_env, method="robust", smoothness_weight=-1.0)
    off = Trainer(tiny_config(tiny_env, method="robust"), tmp_path / "off", progress=False)
    on = Trainer(tiny_config(tiny_env, method="robust", smoothness_weight=1.0), tmp_path / "on",
                 progress=False)
    for trainer in (off, on):
        trainer.collect_initial()
    assert off.update()["smoothness_loss"] == 0.0
    assert on.update()["smoothness_loss"] > 0.0


def test_trailing_contexts_and_fault_episodes_in_training(tiny_env, tmp_path):
    """fault_episode_fraction 1: every collected episode starts intact and its task strikes in
    the suite's fault window; the trailing contexts of a meta-batch hold, for each RL
    transition, exactly the transitions before it in its own episode; training on them
    lowers the critic loss."""
    config = tiny_config(tiny_env, agent={"gamma": 0.9}, context_sampling="trailing",
                         context_segments=4, fault_episode_fraction=1.0)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    calls = []
    run = trainer.rollout.run

    def spy(agent, tasks, seeds, **kwargs):
        calls.append((list(tasks), kwargs["faults"]))
        return run(agent, tasks, seeds, **kwargs)

    trainer.rollout.run = spy
    trainer.collect_initial()
    intact = nominal_task(trainer.setup.robot.num_joints).key()
    scheduled = [event for tasks, faults in calls for event in faults]
    assert [len(f) for f in scheduled] == [1] * TRAIN_TASKS
    assert all(task.key() == intact for tasks, _ in calls for task in tasks)
    assert [f[0].task.key() for f in scheduled] == [t.key() for t in trainer.tasks]
    assert all(0.3 <= f[0].time_s <= 0.6 for f in scheduled)

    window, per_segment = config.context_window, config.batch_size // config.context_segments
    batch, contexts, task_vectors = trainer.sample_trailing([0, 1])
    assert task_vectors is None  # stored only for the oracle or task inference
    assert batch.reward.shape == (2, config.batch_size)
    assert contexts.transitions.shape[:3] == (2, config.context_segments, window + per_segment)
    # the batch's transitions are the last per_segment ones of each segment's sequence
    rl_part = contexts.transitions[:, :, window:].flatten(1, 2)
    torch.testing.assert_close(
        rl_part, make_transition(batch.obs, batch.action, batch.reward, batch.next_obs))
    assert contexts.windows.sum(-1).max() == window
    # a sequence that crosses into task 0's second episode (which starts at buffer row 100):
    # its RL transitions are that episode's steps 0.., whose windows hold min(step, window)
    # transitions, none from the first episode
    trainer.collect([0])
    assert trainer.replay.tasks[0].episode_step[100:200].tolist() == list(range(100))
    crossing = np.arange(100 - window, 100 + per_segment)
    trainer._consecutive_index = lambda task_id, length: crossing
    _, contexts, _ = trainer.sample_trailing([0])
    fill = contexts.windows[0, 0].sum(-1)
    assert fill.tolist() == [min(m, window) for m in range(per_segment)]
    assert contexts.windows[0, 0, :, :window].sum() == 0  # nothing before the reset
    assert contexts.next_windows[0, 0].sum(-1).tolist() == [
        min(m + 1, window) for m in range(per_segment)]

    losses = [trainer.update()["critic_loss"] for _ in range(300)]
    assert all(np.isfinite(losses))
    first, last = float(np.mean(losses[:30])), float(np.mean(losses[-30:]))
    assert last < 0.5 * first, (first, last)


def test_trailing_and_fault_episode_options_are_validated(tiny_env):
    with pytest.raises(ValueError, match="for method pearl"):
        tiny_config(tiny_env, method="robust", context_sampling="trailing")
    with pytest.raises(ValueError, match="must divide by context_segments"):
        tiny_config(tiny_env, context_sampling="trailing", context_segments=5)
    with pytest.raises(ValueError, match="needs context_sampling trailing"):
        tiny_config(tiny_env, fault_episode_fraction=0.5)
    with pytest.raises(ValueError, match="nominal"):
        tiny_config(tiny_env, method="nominal", fault_episode_fraction=0.5)
    assert tiny_config(tiny_env, method="robust", fault_episode_fraction=0.5)
    with pytest.raises(ValueError, match="task_inference_weight > 0 is for method pearl"):
        tiny_config(tiny_env, agent={"task_inference_weight": 1.0})


def test_oracle_fault_episodes_keep_the_task_vector_each_transition_was_acted_on(
        tiny_env, tmp_path):
    """Before the fault the oracle acted on the intact robot's vector, after it on the task's;
    its updates condition each transition on the vector stored with it."""
    config = tiny_config(tiny_env, method="oracle", fault_episode_fraction=1.0)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.collect_initial()
    joints = trainer.setup.robot.num_joints
    intact = nominal_task(joints).oracle_vector(joints)
    dt = trainer.setup.control_dt
    for task, buffer in zip(trainer.tasks, trainer.replay.tasks):
        rows = buffer.condition[: buffer.size]
        changed = np.flatnonzero(np.any(rows != intact, axis=1))
        if np.array_equal(task.oracle_vector(joints), intact):  # the split's intact task
            assert not changed.size
            continue
        assert changed.size, "the task never struck"
        strike = changed[0]
        assert 0.3 / dt - 1 <= strike <= 0.6 / dt + 1  # within the suite's fault window
        np.testing.assert_array_equal(rows[:strike], np.broadcast_to(intact, rows[:strike].shape))
        np.testing.assert_array_equal(rows[strike:],
                                      np.broadcast_to(task.oracle_vector(joints),
                                                      rows[strike:].shape))
    seen = []
    update = trainer.agent.update
    trainer.agent.update = lambda batch, *args, **kwargs: (seen.append(args[2]), update(
        batch, *args, **kwargs))[1]
    stats = trainer.update()
    assert np.isfinite(stats["critic_loss"])
    assert seen[0].shape == (config.meta_batch_tasks, config.batch_size, intact.size)


def test_resume_from_a_replay_without_episode_steps_names_the_problem(trained_run, tmp_path):
    run_dir, config_path, config = trained_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    trainer = Trainer(config, copy_dir, config_path=config_path, progress=False)
    replay_file = trainer.checkpoints.latest() / "replay.npz"
    with np.load(replay_file) as data:
        old = {key: data[key] for key in data.files if not key.endswith("/episode_step")}
    with open(replay_file, "wb") as stream:
        np.savez(stream, **old)
    with pytest.raises(CheckpointError, match="no episode_step"):
        Trainer(config, copy_dir, config_path=config_path, progress=False).resume()


def test_normalized_delta_encoder_is_fitted_on_the_initial_episodes_and_exported(
        tiny_env, tmp_path):
    """encoder_input normalized_delta: the feature statistics come from the initial episodes
    (one 100-step episode per task, the first 100 rows of each buffer), travel with the
    model file, and the exported ONNX graphs pass the parity check with them."""
    from metarl_ros.policy.onnx_export import export_model

    config = tiny_config(tiny_env, agent={"encoder_input": "normalized_delta"})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.run(max_iterations=1)
    encoder = trainer.agent.encoder
    initial = torch.cat([
        make_transition(*(torch.from_numpy(getattr(buffer, field)[:100])
                          for field in ("obs", "action", "reward", "next_obs")))
        for buffer in trainer.replay.tasks])
    obs_dim = trainer.setup.obs_dim
    features = torch.cat([initial[:, :-obs_dim], initial[:, -obs_dim:] - initial[:, :obs_dim]], -1)
    torch.testing.assert_close(encoder.input_mean, features.mean(0))
    torch.testing.assert_close(encoder.input_std, features.std(0).clamp_min(1e-5))

    loaded = load_model(tmp_path / "run" / "model.pt")
    assert loaded.agent.spec.encoder_input == "normalized_delta"
    assert torch.equal(loaded.agent.encoder.input_std, encoder.input_std)
    summary = export_model(tmp_path / "run" / "model.pt", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "step.onnx").is_file(), summary


def test_task_inference_regresses_each_transitions_own_task_vector(tiny_env, tmp_path):
    """task_inference_weight: PEARL's replay keeps the true task vector of every transition
    (intact before a mid-episode fault), each RL transition of a trailing meta-batch carries
    its own, and the head learns to read them off the posterior."""
    config = tiny_config(tiny_env, agent={"task_inference_weight": 1.0, "gamma": 0.9,
                                          "encoder_lr": 3e-3},
                         context_sampling="trailing", context_segments=4,
                         fault_episode_fraction=1.0)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.collect_initial()
    joints = trainer.setup.robot.num_joints
    intact = nominal_task(joints).oracle_vector(joints)
    buffer, task = trainer.replay.tasks[1], trainer.tasks[1]
    assert not np.array_equal(task.oracle_vector(joints), intact)
    rows = buffer.condition[: buffer.size]
    assert np.array_equal(rows[0], intact) and np.array_equal(rows[-1], task.oracle_vector(joints))

    batch, _, task_vectors = trainer.sample_trailing([0, 1])
    assert task_vectors.shape == (2, config.batch_size, intact.size)
    # the vectors belong to the batch's own transitions: look each one up in its buffer
    for t, task_id in enumerate((0, 1)):
        stored = trainer.replay.tasks[task_id]
        for j in (0, config.batch_size - 1):
            row = np.flatnonzero(np.all(stored.obs[: stored.size] == batch.obs[t, j].numpy(), 1))
            np.testing.assert_array_equal(stored.condition[row[0]], task_vectors[t, j].numpy())

    # better than the best constant guess (what a head that ignores z reaches): the
    # spread of the targets about their mean, over every stored transition
    stored = np.concatenate([b.condition[: b.size] for b in trainer.replay.tasks])
    constant = float(((stored - stored.mean(0)) ** 2).mean())
    losses = [trainer.update()["task_inference_loss"] for _ in range(1500)]
    assert all(np.isfinite(losses)) and losses[0] > constant
    assert np.mean(losses[-50:]) < 0.75 * constant, (constant, losses[-50:])
    path = trainer.write_final_model()
    assert load_model(path).agent.task_head is not None
