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
from metarl_ros.core.schema import ConfigError
from metarl_ros.evaluation.evaluate import (
    action_oscillation,
    context_window,
    load_method_models,
    rolling_mean,
)
from metarl_ros.learning.checkpoint import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    CheckpointDirectory,
    CheckpointError,
    load_model_payload,
    model_env_config,
    portable_env_path,
)
from metarl_ros.learning.config import (
    AgentConfig,
    DynamicsConfig,
    TrainConfig,
    apply_overrides,
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
    """The shipped recipe's settings (nominal: without fault episodes or smoothness, as its
    recipe says) on the tiny env, with few, small networks and updates."""
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
    if method == "nominal":
        fields.update(fault_episode_fraction=0.0, smoothness_weight=0.0)
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
    # training longer is the same run continued: a larger total is accepted on resume
    longer = config.model_copy(update={"total_iterations": config.total_iterations + 10})
    resumed = Trainer(longer, tmp_path / "resumed", progress=False)
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
    shorter = write_config(config.model_copy(update={"total_iterations": 1}),
                           tmp_path / "shorter.yaml")  # fewer than the 2 already done
    code = metarl_main(["train", "--config", str(shorter), "--out", str(out), "--resume",
                        "--no-progress"])
    assert code == 2
    assert "total_iterations: 4 -> 1" in capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing  # nothing written


def test_config_changes_read_stored_configs_of_older_versions(tiny_env):
    config = tiny_config(tiny_env, method="pearl")
    stored = config.model_dump(mode="json")
    assert config_changes(stored, config) == []
    # a run written before an option existed: the same run under the option's default ...
    del stored["init_critic_condition"]
    assert config_changes(stored, config) == []
    # ... or, where the default has changed since, under what the run did without it
    del stored["smoothness_weight"]
    assert config_changes(stored, config) == ["smoothness_weight: 0.0 -> 1.0"]
    stored["smoothness_weight"] = 1.0
    # removed options: at the value that did nothing they are no change, else no such run
    retired = {**stored, "intact_fraction": 0.0, "critic_warmup_updates": 0,
               "agent": {**stored["agent"], "encoder_input": "raw", "reconstruction_weight": 0.0,
                         "decoder_hidden": [64], "task_inference_weight": 0.0}}
    assert config_changes(retired, config) == []
    for key, value in (("intact_fraction", 0.1), ("critic_warmup_updates", 600)):
        (change,) = config_changes({**retired, key: value}, config)
        assert change.startswith("stored config no longer valid") and key in change, change
    (change,) = config_changes(
        {**retired, "agent": {**retired["agent"], "encoder_input": "normalized_delta"}}, config)
    assert "agent.encoder_input" in change and "removed" in change
    stored["agent"]["kl_weight"] = config.agent.kl_weight * 2
    assert config_changes(stored, config) == [
        f"agent.kl_weight: {config.agent.kl_weight * 2!r} -> {config.agent.kl_weight!r}"]
    stored["no_such_option"] = 1
    (change,) = config_changes(stored, config)
    assert change.startswith("stored config no longer valid") and "no_such_option" in change


def test_config_changes_compare_only_what_the_method_uses(tiny_env):
    """No context, encoder or dynamics models outside pearl: their fields are no change."""
    config = tiny_config(tiny_env, method="robust")
    stored = config.model_dump(mode="json")
    stored.update(context_sampling="task", min_context=3)
    stored["agent"] = {**stored["agent"], "kl_weight": 0.1, "latent_dim": 16}
    stored["dynamics"] = {**stored["dynamics"], "enabled": False, "model": "mlp"}
    assert config_changes(stored, config) == []
    stored["agent"]["gamma"] = 0.9
    assert config_changes(stored, config) == [f"agent.gamma: 0.9 -> {config.agent.gamma!r}"]
    pearl = tiny_config(tiny_env, method="pearl")
    stored = {**pearl.model_dump(mode="json"), "min_context": 3}
    assert config_changes(stored, pearl) == ["min_context: 3 -> 1"]


def test_shipped_models_were_trained_with_their_recipes():
    """Each shipped model file's stored config, read as today's schema, is its recipe plus
    ``--seed`` (the seed chosen among the trained ones)."""
    for method in ("nominal", "oracle", "robust", "pearl"):
        path = share_directory() / "models" / method / "model.pt"
        if not path.is_file():
            pytest.skip("no shipped models")
        stored = load_model_payload(path)["train_config"]
        recipe = load_train_config(share_directory() / "config" / f"train_{method}.yaml",
                                   [f"seed={stored['seed']}"])
        assert config_changes(stored, recipe) == [], method


# ------------------------------------------------------------------------------------------
# overrides: metarl train --seed / --set
# ------------------------------------------------------------------------------------------


def test_apply_overrides_sets_dotted_keys_as_yaml_values():
    config = {"seed": 1, "agent": {"kl_weight": 0.1, "gamma": 0.95}}
    result = apply_overrides(config, ["agent.kl_weight=1e-3", "seed=7",
                                      "agent.actor_hidden=[64, 64]", "init_from=null",
                                      "dynamics.first_order=true", "seed=8"])
    assert result == {"seed": 8, "init_from": None, "dynamics": {"first_order": True},
                      "agent": {"kl_weight": "1e-3", "gamma": 0.95, "actor_hidden": [64, 64]}}
    assert config == {"seed": 1, "agent": {"kl_weight": 0.1, "gamma": 0.95}}  # untouched
    for bad in ("seed", "=3", "agent..gamma=1", "seed.x=1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            apply_overrides(config, [bad])


def test_overrides_are_validated_by_the_schema_naming_the_key(tmp_path):
    recipe = share_directory() / "config" / "train_pearl.yaml"
    config = load_train_config(recipe, ["agent.kl_weight=1e-2", "dynamics.inner_steps=3"])
    base = load_train_config(recipe)
    assert config == base.model_copy(update={
        "agent": base.agent.model_copy(update={"kl_weight": 0.01}),
        "dynamics": base.dynamics.model_copy(update={"inner_steps": 3})})
    for item, fragment in (("agent.no_such_field=1", "agent.no_such_field"),
                           ("agent.kl_weight=much", "agent.kl_weight"),
                           ("dynamics.inner_steps=0", "dynamics.inner_steps"),
                           ("seed.deeper=1", "seed")):
        with pytest.raises(ConfigError) as info:
            load_train_config(recipe, [item])
        message = str(info.value)
        assert str(recipe) in message and fragment in message and item in message, message


def test_metarl_train_seed_and_set_are_recorded_in_the_run(tiny_env, tmp_path, capsys):
    config = tiny_config(tiny_env, method="robust", updates_per_iteration=2, total_iterations=1)
    config_path = write_config(config, tmp_path / "train.yaml")
    out = tmp_path / "run"
    args = ["train", "--config", str(config_path), "--out", str(out), "--no-progress"]
    assert metarl_main([*args, "--seed", "5", "--set", "agent.gamma=0.9"]) == 0
    stored = load_model_payload(out / "model.pt")["train_config"]
    assert stored["seed"] == 5 and stored["agent"]["gamma"] == 0.9
    expected = config.model_copy(update={"seed": 5, "agent": config.agent.model_copy(
        update={"gamma": 0.9})})
    assert load_train_config(out / "config.yaml") == expected
    # --resume compares against what the run was started with, overrides included
    assert metarl_main([*args, "--resume", "--seed", "6", "--set", "agent.gamma=0.9"]) == 2
    assert "seed: 5 -> 6" in capsys.readouterr().err
    assert metarl_main([*args, "--resume", "--seed", "5", "--set", "agent.gamma=0.8"]) == 2
    assert "agent.gamma: 0.9 -> 0.8" in capsys.readouterr().err
    assert metarl_main([*args, "--set", "agent.gama=0.9"]) == 2
    assert "agent.gama" in capsys.readouterr().err


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
    with pytest.raises(CheckpointError) as info:  # torch's advice is not for untrusted files
        load_model(noise)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)

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


def test_model_files_with_removed_agent_options(model_dir, tmp_path):
    """Files written while the agent had options since removed: at the value that did nothing
    they load as they are; at another value the file names the option."""
    payload = torch.load(model_dir / "pearl" / "model.pt", weights_only=True)
    neutral = {"encoder_input": "raw", "reconstruction_weight": 0.0, "decoder_hidden": (128,),
               "task_inference_weight": 0.0}
    old = tmp_path / "old.pt"
    torch.save({**payload, "agent_spec": {**payload["agent_spec"], **neutral}}, old)
    assert load_model(old).agent.spec == load_model(model_dir / "pearl").agent.spec
    for key, value in (("reconstruction_weight", 5.0), ("encoder_input", "normalized_delta")):
        torch.save({**payload, "agent_spec": {**payload["agent_spec"], **neutral, key: value}},
                   old)
        expect_checkpoint_error(old, "agent spec does not match this version", key, "removed")


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


def test_checkpoint_dir_with_dangling_latest_pointer(trained_run, tmp_path, capsys):
    """``latest`` names a folder that is not there: resume says so and takes the newest
    complete checkpoint; with none left, it fails naming every problem."""
    run, _, config = trained_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "checkpoints" / "latest").write_text("step_000000777\n")
    trainer = Trainer(config, out, progress=False)
    assert trainer.resume() and trainer.iteration == 2
    printed = capsys.readouterr().out
    assert "step_000000777: incomplete checkpoint" in printed
    assert "resuming from step_000000002 instead" in printed
    for step in (out / "checkpoints").glob("step_*"):
        shutil.rmtree(step)
    with pytest.raises(CheckpointError, match="no readable checkpoint to resume from"):
        Trainer(config, out, progress=False).resume()


@pytest.fixture(scope="module")
def two_checkpoints(tiny_env, tmp_path_factory) -> tuple[Path, Path]:
    """A run checkpointed after iteration 1 and, resumed, after iteration 2; its config."""
    root = tmp_path_factory.mktemp("two_checkpoints")
    config = tiny_config(tiny_env)
    config_path = write_config(config, root / "train.yaml")
    Trainer(config, root / "run", config_path=config_path, progress=False).run(max_iterations=1)
    trainer = Trainer(config, root / "run", config_path=config_path, progress=False)
    assert trainer.resume()
    trainer.run(max_iterations=1)
    return root / "run", config_path


@pytest.mark.parametrize("damage", ["train_state.pt", "replay.npz", "model.pt"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_says_so(two_checkpoints, tmp_path,
                                                                 capsys, damage):
    """A truncated train_state.pt or replay.npz (RuntimeError / BadZipFile before), or a
    model.pt of random bytes, in the newest checkpoint: resume from the previous one."""
    run, config_path = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(run, out)
    newest = out / "checkpoints" / "step_000000002"
    assert (out / "checkpoints" / "step_000000001").is_dir() and (newest / damage).is_file()
    data = (newest / damage).read_bytes()
    if damage == "model.pt":
        damaged = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    else:
        damaged = data[: len(data) // 2]
    (newest / damage).write_bytes(damaged)
    code = metarl_main(["train", "--config", str(config_path), "--out", str(out), "--resume",
                        "--iterations", "0", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"skipping a damaged checkpoint: {newest / damage}: " in printed.out
    assert "truncated or corrupt" in printed.out or "not a PyTorch checkpoint" in printed.out
    assert "resuming from step_000000001 instead, the previous complete checkpoint" in printed.out
    assert "resumed" in printed.out and "at iteration 1" in printed.out
    assert "weights_only" not in printed.out + printed.err
    assert "Traceback" not in printed.err


def test_checkpoint_folders_honour_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        folder = CheckpointDirectory(tmp_path).save(1, {"a.pt": {"x": torch.zeros(2)}})
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o750  # mkdtemp alone gave 0o700
    assert (folder / "a.pt").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------

METRIC_KEYS = ("post_rms_mrad", "peak_mrad", "pre_rms_mrad", "effort_rms_nm", "oscillation_nm",
               "action_oscillation")


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


def test_metarl_eval_on_a_split_writes_documented_json_and_plot(model_dir, tmp_path, capsys,
                                                                monkeypatch):
    from metarl_ros.evaluation import methods as registry

    for name in ("ceiling", "dob", "adaptive_ct", "adaptive_ff"):  # the learned methods alone
        monkeypatch.delitem(registry.METHODS, name)
    out_json, out_png = tmp_path / "eval" / "out.json", tmp_path / "eval" / "out.png"
    code = metarl_main(["eval", "--model", str(model_dir), "--split", "heldout", "--episodes", "2",
                        "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out_json.read_text())
    assert set(result) == {"protocol", "results", "compliance"}
    methods = ("oracle", "robust", "nominal", "pearl", "maml", "pearl_maml", "pearl_adapt")
    condition = result["results"]["seed0"]["split_heldout"]["conditions"]["in_range"]
    assert condition["scope"] == "in_range" and condition["episodes"] == 2
    assert set(condition["methods"]) == set(methods)
    for method in methods:
        metrics = condition["methods"][method]
        for key in METRIC_KEYS:
            mean, (low, high) = metrics[key]["mean"], metrics[key]["ci95"]
            assert np.isfinite(mean) and low <= mean + 1e-12 and mean <= high + 1e-12, (method,
                                                                                          key)
        assert metrics["post_rms_mrad"]["mean"] > 0.0
        assert 0.0 <= metrics["recovery"]["recovered_fraction"]["mean"] <= 1.0
        assert metrics["gap_closed"]["reason"] == "no ceiling run"
    # what the MAML correction adds, paired with the same policy without it, per episode
    paired = {(p["a"], p["b"]): p for p in condition["paired"]}
    for method, base in (("maml", "robust"), ("pearl_maml", "pearl")):
        diff = paired[(method, base)]["post_rms_mrad_diff"]["mean"]
        expected = (condition["methods"][method]["post_rms_mrad"]["mean"]
                    - condition["methods"][base]["post_rms_mrad"]["mean"])
        assert diff == pytest.approx(expected, rel=1e-9, abs=1e-12)
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
    assert set(models) == {"nominal", "robust", "pearl"}
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shutil.rmtree(partial / "pearl")
    with pytest.raises(CheckpointError, match=r"pearl/model.pt: missing; method\(s\) \['maml'\]"):
        load_method_models(partial, ["oracle", "maml"])
    assert set(load_method_models(partial, ["robust"])) == {"nominal", "robust"}


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


# ------------------------------------------------------------------------------------------
# structured MAML dynamics, warm start, trust region, smoothness, trailing contexts
# ------------------------------------------------------------------------------------------


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
    # the full-view actor: a feed-forward actor starts as the zero residual, which is smooth
    full = {"actor_view": "full", "actor_head": "mlp"}
    off = Trainer(tiny_config(tiny_env, method="robust", smoothness_weight=0.0, agent=full,
                              parameter_weight=0.0), tmp_path / "off", progress=False)
    on = Trainer(tiny_config(tiny_env, method="robust", smoothness_weight=1.0, agent=full,
                             parameter_weight=0.0), tmp_path / "on", progress=False)
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
    batch, contexts = trainer.sampler.trailing([0, 1])
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
    trainer.sampler.consecutive_index = lambda task_id, length: crossing
    _, contexts = trainer.sampler.trailing([0])
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
    with pytest.raises(ValueError, match="must divide by context_segments"):
        tiny_config(tiny_env, context_sampling="trailing", context_segments=5)
    with pytest.raises(ValueError, match="needs context_sampling trailing"):
        tiny_config(tiny_env, context_sampling="task", fault_episode_fraction=0.5)
    assert tiny_config(tiny_env, context_sampling="task", fault_episode_fraction=0.0)
    with pytest.raises(ValueError, match="nominal"):
        tiny_config(tiny_env, method="nominal", fault_episode_fraction=0.5)
    assert tiny_config(tiny_env, method="robust", fault_episode_fraction=0.5)
    # the other methods have no context: its settings change nothing there
    assert tiny_config(tiny_env, method="robust", context_sampling="trailing")


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
