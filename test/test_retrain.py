"""Offline retraining from bags, without ROS: bag -> transitions -> TD3+BC -> model + ONNX.

Bags are written through the recorder's writer (:class:`metarl_ros.recording.bag.BagWriter`) by
:func:`metarl_ros.learning.sim_recording.record_simulated_run`: the simulated arm, the
adapter's own control loop and sim_node's topics, stamps and true-task events. The recording
through the real recorder node over DDS is in test_bag_recorder.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bag_helpers import (
    FAULT_LABEL,
    FAULT_TIME_S,
    JOINTS,
    RUN_S,
    fault_event,
    rewrite_bag,
    tiny_model,
    write_tiny_env,
)

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.control.policy_interface import PosteriorSummary
from metarl_ros.learning.bag_dataset import read_bag
from metarl_ros.learning.bag_tasks import (
    SegmentationConfig,
    build_tasks,
    posterior_change_points,
    split_by_events,
)
from metarl_ros.learning.checkpoint import load_model_payload
from metarl_ros.learning.saved_model import load_model
from metarl_ros.learning.sim_recording import CdrMessages, record_simulated_run
from metarl_ros.policy.factory import make_policy, setup_contract
from metarl_ros.recording.bag import (
    FLOAT64_ARRAY,
    JOINT_STATE,
    BagWriter,
    Float64ArrayDecoder,
    JointStateColumns,
    JointStateDecoder,
    bag_is_complete,
    jazzy_typestore,
)
from metarl_ros.sim.env_config import load_env_setup

torch.set_num_threads(1)

RETRAIN_CONFIG = {
    "training": {"updates": 600, "batch_size": 64},
    "evaluation": {"seeds": [0, 1]},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    return write_tiny_env(tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="module")
def setup(env):
    return load_env_setup(env)


@pytest.fixture(scope="module")
def model(env, tmp_path_factory) -> Path:
    return tiny_model(env, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def pd_bag(setup, tmp_path_factory) -> Path:
    """The env's PD controller through the control loop, the fault at 1 s, 2 s recorded."""
    path = tmp_path_factory.mktemp("bags") / "pd_run"
    record_simulated_run(path, setup, make_policy("pd", setup), RUN_S, faults=[fault_event()],
                         seed=5)
    return path


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(RETRAIN_CONFIG))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RandomPolicy:
    """Implements AdaptivePolicy: random residual actions; records what the loop observed."""

    def __init__(self, setup) -> None:
        self.contract = setup_contract(setup)
        self.rng = np.random.default_rng(1)
        self.observed: list[tuple] = []

    def reset(self) -> None:
        pass

    def observe(self, obs, action, reward, next_obs) -> None:
        self.observed.append((obs.copy(), np.asarray(action).copy(), reward, next_obs.copy()))

    def act(self, obs):
        return self.rng.uniform(-0.4, 0.4, self.contract.act_dim).astype(np.float32)

    def posterior(self) -> PosteriorSummary:
        return PosteriorSummary(np.zeros(2), np.ones(2), 0)


# ------------------------------------------------------------------------------------------
# bag -> transitions


@pytest.mark.parametrize("joint_state_rate_hz", [100.0, 500.0])
def test_transitions_are_the_control_loops(setup, tmp_path, joint_state_rate_hz):
    """Rebuilt (s, a, r, s') equal what the adapter's control loop fed its policy online."""
    policy = RandomPolicy(setup)
    path = tmp_path / "bag"
    record_simulated_run(path, setup, policy, 1.5, faults=[fault_event()], seed=2,
                         joint_state_rate_hz=joint_state_rate_hz)
    bag = read_bag(path, setup, JOINTS)
    obs, action, reward, next_obs = (np.stack([o[i] for o in policy.observed]) for i in range(4))
    assert len(bag) == len(policy.observed) == 150
    assert not bag.dropped
    np.testing.assert_array_equal(bag.obs, obs)
    np.testing.assert_allclose(bag.action, action, atol=1e-6)  # float32 of a float64 inverse
    np.testing.assert_array_equal(bag.next_obs, next_obs)
    np.testing.assert_allclose(bag.reward, reward, rtol=1e-6)
    parts = split_by_events(bag)
    assert [label for _, label, _ in parts] == ["initial", FAULT_LABEL]
    first_faulty = parts[1][2][0]
    assert bag.time_s[first_faulty] == pytest.approx(FAULT_TIME_S)  # the step it struck in
    assert parts[1][0].payload_mass == 1.5


def test_fast_decoders_agree_with_rosbags():
    store = jazzy_typestore()
    messages = CdrMessages(store)
    rng = np.random.default_rng(0)
    decoder, array_decoder = JointStateDecoder(), Float64ArrayDecoder()
    for i in range(300):
        n = int(rng.integers(1, 9))
        names = ["j" * int(rng.integers(1, 4)) + str(k) for k in range(n)]
        values = [rng.normal(size=n) for _ in range(3)]
        if i % 3 == 0:
            values[2] = np.zeros(0)
        raw = messages.joint_state(int(rng.integers(0, 10**15)), names, *values)
        got = decoder(raw)
        ref = store.deserialize_cdr(raw, JOINT_STATE)
        assert got.names == tuple(ref.name)
        assert got.stamp_ns == ref.header.stamp.sec * 10**9 + ref.header.stamp.nanosec
        for a, b in zip((got.position, got.velocity, got.effort),
                        (ref.position, ref.velocity, ref.effort)):
            np.testing.assert_array_equal(a, b)
        raw = messages.array(rng.normal(size=n))
        np.testing.assert_array_equal(array_decoder(raw),
                                      store.deserialize_cdr(raw, FLOAT64_ARRAY).data)


def test_joint_state_columns_decode_runs_of_layouts():
    """Column-wise decoding over layout changes equals message-by-message deserialization."""
    store = jazzy_typestore()
    messages = CdrMessages(store)
    rng = np.random.default_rng(1)
    raws = []
    for block in range(6):  # runs of one layout, then another (names, sizes, effort)
        n = 7 if block % 2 == 0 else 3
        names = JOINTS[:n] if block != 4 else JOINTS[:n][::-1]
        for _ in range(int(rng.integers(1, 30))):
            effort = rng.normal(size=n) if block != 2 else np.zeros(0)
            raws.append(messages.joint_state(int(rng.integers(0, 10**12)), names,
                                             rng.normal(size=n), rng.normal(size=n), effort))
    columns = JointStateColumns()
    for raw in raws:
        columns.add(raw)
    rows = []
    for layout, stamps, position, velocity, effort in columns.runs():
        for i in range(len(stamps)):
            rows.append((layout.names, stamps[i], position[i], velocity[i], effort[i]))
    assert len(rows) == len(raws) == len(columns)
    for (names, stamp, position, velocity, effort), raw in zip(rows, raws):
        ref = store.deserialize_cdr(raw, JOINT_STATE)
        assert names == tuple(ref.name)
        assert stamp == ref.header.stamp.sec * 10**9 + ref.header.stamp.nanosec
        np.testing.assert_array_equal(position, ref.position)
        np.testing.assert_array_equal(velocity, ref.velocity)
        np.testing.assert_array_equal(effort, ref.effort)


def test_sqlite3_version8_bag_reads_the_same(setup, pd_bag, tmp_path):
    """The Humble option: sqlite3 storage, rosbag2 metadata version 8."""
    path = tmp_path / "humble"
    rewrite_bag(pd_bag, path, lambda *m: m, storage="sqlite3")
    metadata = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["version"] == 8 and metadata["storage_identifier"] == "sqlite3"
    a, b = read_bag(pd_bag, setup, JOINTS), read_bag(path, setup, JOINTS)
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.reward, b.reward)


def test_posterior_change_points_find_a_step():
    """Factors jump at step 230; the streaming posterior (window 10) ramps over the window."""
    rng = np.random.default_rng(0)
    window = 10
    factors = rng.normal(0.0, 0.05, size=(400, 4))
    factors[230:] += 1.0
    cumulative = np.vstack([np.zeros((1, 4)), np.cumsum(factors, 0)])
    end = np.arange(1, 401)
    start = np.maximum(end - window, 0)
    mean = (cumulative[end] - cumulative[start]) / (end - start)[:, None]  # equal precisions
    std = np.full_like(mean, 0.1)
    points = posterior_change_points(mean, std, window, SegmentationConfig(min_segment_steps=30))
    assert points == [230]
    assert posterior_change_points(mean[:200], std[:200], window) == []


def test_without_events_the_posterior_splits(setup, model, pd_bag, tmp_path):
    """No task events: the encoder's streaming posterior decides (here: it runs, counts)."""
    path = tmp_path / "no_events"
    rewrite_bag(pd_bag, path, lambda *m: None if m[0] == "/sim/true_task" else m)
    bag = read_bag(path, setup, JOINTS)
    assert not bag.events
    tasks, how = build_tasks([bag], load_model(model).agent.encoder, window=8)
    assert "posterior change points" in how[str(path)]
    assert sum(len(t) for t in tasks) == len(bag) == 200


# ------------------------------------------------------------------------------------------
# metarl retrain


def test_retrain_improves_on_the_recorded_fault(model, pd_bag, tmp_path, config_file, capsys):
    """PD data with a mid-run fault -> TD3+BC from an untrained model -> better on that fault,
    same seeds; new model.pt and ONNX written, the input untouched."""
    before = _digest(model)
    out = tmp_path / "retrained"
    code = metarl_main(["retrain", "--bag", str(pd_bag), "--model", str(model), "--out", str(out),
                        "--config", str(config_file), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert _digest(model) == before
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "model.pt", "onnx",
                                                     "retrain.json"]
    assert {"policy.onnx", "encoder.onnx", "export.json"} <= {p.name for p in (out / "onnx")
                                                             .iterdir()}
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["seeds"] == [0, 1]
    assert evaluation["episodes"][0]["faults"][0]["label"] == FAULT_LABEL
    pre, post = evaluation["before"], evaluation["after"]
    assert [e["seed"] for e in pre["episodes"]] == [e["seed"] for e in post["episodes"]]
    # the recorded fault: 1 s after it, summed reward (higher is better)
    assert post["post_fault_return_mean"] > pre["post_fault_return_mean"] + 10.0, (pre, post)
    assert post["tracking_error_after_fault_mean"] < pre["tracking_error_after_fault_mean"]
    report = json.loads((out / "retrain.json").read_text())
    assert report["bags_read"][0]["transitions"] == 200
    assert [t["transitions"] for t in report["tasks"]] == [100, 100]
    payload = load_model_payload(out / "model.pt")
    assert payload["metadata"]["retrained_from"] == str(model)
    assert payload["contract"] == load_model_payload(model)["contract"]
    assert "dropped" in printed or "transitions" in printed
    assert "/joint_states" in printed and "2 task(s)" in printed


# ------------------------------------------------------------------------------------------
# bad input: a clear error naming the problem, --out untouched


def _retimed_joint_states(shift):
    """Transform re-stamping /joint_states with ``shift(stamp_ns) -> stamp_ns``."""
    decoder = JointStateDecoder()
    messages = CdrMessages(jazzy_typestore())

    def transform(topic, msgtype, log_ns, raw):
        if topic != "/joint_states":
            return topic, msgtype, log_ns, raw
        msg = decoder(raw)
        return topic, msgtype, log_ns, messages.joint_state(
            shift(msg.stamp_ns), msg.names, msg.position, msg.velocity, msg.effort)
    return transform


def _renamed_joints(topic, msgtype, log_ns, raw):
    if topic != "/joint_states":
        return topic, msgtype, log_ns, raw
    msg = JointStateDecoder()(raw)
    names = [name.replace("lbr_iiwa", "ur5") for name in msg.names]
    return topic, msgtype, log_ns, CdrMessages(jazzy_typestore()).joint_state(
        msg.stamp_ns, names, msg.position, msg.velocity, msg.effort)


def _custom_store():
    from rosbags.typesys import get_types_from_msg

    store = jazzy_typestore()
    store.register(get_types_from_msg("float64[] efforts", "acme_msgs/msg/Effort"))
    return store


def _cut_mcap(path: Path) -> None:
    data = next(path.glob("*.mcap"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


BAD_BAGS = {
    "missing topic": (lambda *m: None if m[0] == "/reference" else m, None,
                      "missing topic /reference"),
    "unknown message type": (
        lambda t, ty, log, raw: (t, "acme_msgs/msg/Effort", log, raw)
        if t == "/effort_controller/commands" else (t, ty, log, raw), _custom_store,
        "unknown message type 'acme_msgs/msg/Effort'"),
    "no commands": (lambda *m: None if m[0] == "/effort_controller/commands" else m, None,
                    "missing topic /effort_controller/commands"),
    "joint names": (_renamed_joints, None, "joint names on /joint_states do not match"),
    "clock backwards": (_retimed_joint_states(
        lambda ns: ns - 700_000_000 if ns >= 1_500_000_000 else ns), None,
        "clock jump on /joint_states: stamp went back"),
    "clock gap": (_retimed_joint_states(
        lambda ns: ns + 3_000_000_000 if ns >= 1_500_000_000 else ns), None,
        "clock jump on /joint_states: 3.010 s gap"),
}


@pytest.mark.parametrize("case", sorted(BAD_BAGS))
def test_bad_bags_are_named_and_out_untouched(case, model, pd_bag, tmp_path, capsys):
    transform, store, needle = BAD_BAGS[case]
    bad = tmp_path / "bad"
    rewrite_bag(pd_bag, bad, transform, typestore=store() if store else None)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty --out is allowed, and must stay empty
    code = metarl_main(["retrain", "--bag", str(bad), "--model", str(model), "--out", str(out),
                        "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err, err
    assert str(bad) in err
    assert list(out.iterdir()) == []
    assert not list(tmp_path.glob(".out.*"))  # no staging left behind


def test_empty_bag_and_bag_without_commands(model, tmp_path, capsys):
    empty = tmp_path / "empty"
    with BagWriter(empty) as writer:
        writer.add_topic("/joint_states", JOINT_STATE)
    silent = tmp_path / "silent"
    with BagWriter(silent) as writer:
        for topic, msgtype in (("/joint_states", JOINT_STATE), ("/reference", JOINT_STATE),
                               ("/effort_controller/commands", FLOAT64_ARRAY)):
            writer.add_topic(topic, msgtype)
        state = CdrMessages(writer.typestore).joint_state(0, JOINTS, [0.0] * 7, [0.0] * 7, [])
        writer.write("/joint_states", 1, state)
    for bag, needle in ((empty, "empty bag"), (silent, "has no commands")):
        out = tmp_path / f"out_{bag.name}"
        code = metarl_main(["retrain", "--bag", str(bag), "--model", str(model), "--out",
                            str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and str(bag) in err, err
        assert not out.exists()


def test_truncated_bags(model, pd_bag, tmp_path, capsys):
    """A recorder that never closed its bag (no metadata.yaml), and a cut data file."""
    unclosed = tmp_path / "unclosed"
    shutil.copytree(pd_bag, unclosed)
    (unclosed / "metadata.yaml").unlink()
    assert not bag_is_complete(unclosed)
    cut = tmp_path / "cut"
    shutil.copytree(pd_bag, cut)
    _cut_mcap(cut)
    for bag in (unclosed, cut):
        out = tmp_path / f"out_{bag.name}"
        code = metarl_main(["retrain", "--bag", str(bag), "--model", str(model), "--out",
                            str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "truncated" in err and str(bag) in err, err
        assert not out.exists()


def test_out_must_be_new_or_empty(model, pd_bag, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = metarl_main(["retrain", "--bag", str(pd_bag), "--model", str(model), "--out", str(out),
                        "--no-progress"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------
# context-free models, strict JSON, leftovers of killed runs, permissions


def _robust_model(env: Path, run_dir: Path) -> Path:
    from metarl_ros.learning.config import AgentConfig, DynamicsConfig, TrainConfig
    from metarl_ros.learning.trainer import Trainer

    config = TrainConfig(
        method="robust", env=str(env), seed=3, envs_per_iteration=2, eval_tasks=2,
        replay_capacity_per_task=1000, torch_threads=1,
        agent=AgentConfig(actor_hidden=[32, 32], critic_hidden=[32, 32]),
        dynamics=DynamicsConfig(enabled=False))
    trainer = Trainer(config, run_dir, progress=False)
    path = trainer.write_final_model()
    trainer.rollout.close()
    trainer.eval_rollout.close()
    return path


def test_retrain_a_context_free_model_writes_strict_json_and_cleans_up(env, pd_bag, tmp_path,
                                                                        capsys):
    """A robust model (no encoder) retrains and exports (export crashed on the missing
    encoder); retrain.json is strict JSON although the actor's loss is not computed during the
    critic warm-up (it held a bare NaN); staging folders a killed retrain left are removed,
    another running retrain's are not; --out honours the umask."""
    import os
    import subprocess
    import sys

    model = _robust_model(env, tmp_path / "run")
    out = tmp_path / "robust_v2"
    killed = [tmp_path / ".robust_v2.999999999-dead.tmp", tmp_path / ".robust_v2.oldname.tmp"]
    for folder in killed:
        (folder / "onnx").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    running = tmp_path / f".robust_v2.{sleeper.pid}-live.tmp"
    running.mkdir()
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({"training": {"updates": 20, "batch_size": 16},
                                      "evaluation": {"enabled": False}}))
    old_umask = os.umask(0o027)
    try:
        code = metarl_main(["retrain", "--bag", str(pd_bag), "--model", str(model), "--out",
                            str(out), "--config", str(config), "--no-progress"])
    finally:
        os.umask(old_umask)
        sleeper.kill()
        sleeper.wait()
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["export.json", "policy.onnx"]
    text = (out / "retrain.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert report["training"]["final/actor_loss"] is None  # 20 updates: all in the warm-up
    json.loads((out / "eval.json").read_text(),
               parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert not any(folder.exists() for folder in killed)
    assert running.exists()
    assert "left by a retrain that was killed" in printed.out
    assert (out.stat().st_mode & 0o777) == 0o750
    assert (out / "model.pt").stat().st_mode & 0o777 == 0o640
