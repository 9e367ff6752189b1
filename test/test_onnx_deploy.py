"""Deploying an exported model: ONNX parity, onnx_policy_node, commands, joint_map, graphs.

One tiny PEARL model of the shipped layout (32-wide, latent 4, window 8; untrained weights:
parity and plumbing do not need a good policy) is saved and exported once per module with
``metarl_ros.policy.onnx_export.export_model``. Needs torch to *make* the model; the node under
test never imports it (checked in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import Collector, RosSession, domain_id, params, wait_for
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from test_launch_graph import _check_nodes_against_graph, stand_in_launch_description
from test_ros_nodes import TrackingMonitor
from trajectory_msgs.msg import JointTrajectory

from metarl_ros.control.joint_map import JointMap
from metarl_ros.control.law import build_observation, effort_command
from metarl_ros.core.schema import ConfigError
from metarl_ros.graph.spec import (
    DEPLOY_ARGUMENTS,
    adapt_sim_graph,
    deploy_graph,
    parameter_file_path,
)
from metarl_ros.nodes.adapter_node import AdapterNode
from metarl_ros.nodes.common import STATE_QOS, ns_to_stamp
from metarl_ros.nodes.onnx_policy_node import OnnxPolicyNode
from metarl_ros.nodes.sim_node import SimNode
from metarl_ros.policy.onnx_policy import ModelContractError, OnnxAdaptivePolicy
from metarl_ros.sim.env_config import load_env_setup

torch = pytest.importorskip("torch", reason="making the test model needs torch")

REPO = Path(__file__).resolve().parent.parent
SETUP = load_env_setup()
JOINTS = list(SETUP.robot.joint_names)
N = len(JOINTS)
ROBOT_JOINTS = [f"arm_joint_{i + 1}" for i in range(N)]
JOINT_MAP = [f"{m}:{r}" for m, r in zip(JOINTS, ROBOT_JOINTS)]
SCENARIO = "config/scenarios/default.yaml"
RUN_S = 8.0  # through both events of the default scenario: payload at 3 s, motor damage at 7 s
WINDOW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """``(model.pt, export directory)`` of a tiny PEARL model for the shipped env."""
    from metarl_ros.learning.config import AgentConfig, DynamicsConfig, TrainConfig
    from metarl_ros.learning.trainer import Trainer
    from metarl_ros.policy.onnx_export import export_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx_model")
    config = TrainConfig(
        method="pearl", env=str(SETUP.path), seed=5, total_iterations=1, envs_per_iteration=1,
        updates_per_iteration=1, meta_batch_tasks=1, batch_size=8, eval_tasks=1,
        eval_every_iterations=100, replay_capacity_per_task=100, initial_episodes_per_task=1,
        torch_threads=1, context_window=WINDOW,
        agent=AgentConfig(actor_hidden=[32, 32], critic_hidden=[32, 32], encoder_hidden=[32],
                          latent_dim=4),
        dynamics=DynamicsConfig(enabled=False))
    model_path = Trainer(config, root / "run", progress=False).write_final_model()
    summary = export_model(model_path, root / "onnx")
    assert summary["max_abs_diff"] <= 1e-5 and summary["max_scaled_diff"] <= 1e-5
    return model_path, root / "onnx"


def _ros_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(_domain()), ROS_LOCALHOST_ONLY="1",
               ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1",
               RCUTILS_LOGGING_BUFFERED_STREAM="0")
    return env


_DOMAIN: list[int] = []


def _domain() -> int:
    if not _DOMAIN:
        _DOMAIN.append(domain_id(offset=83))
    return _DOMAIN[0]


@pytest.fixture(scope="module")
def ros():
    session = RosSession(_domain())
    yield session
    session.close()


# ------------------------------------------------------------------------------ ONNX parity


def test_onnxruntime_matches_torch_actions_and_posterior(model):
    """Same transitions into both runtimes: actions and posterior agree to 1e-5 every step,
    through more steps than the window holds (the ONNX ring buffer wraps). ``ticking`` runs
    as the control loop does (observe, act: one step.onnx call); ``asking`` reads the posterior
    before acting (encoder.onnx, then policy.onnx)."""
    from metarl_ros.learning.saved_model import load_model
    from metarl_ros.policy.torch_policy import TorchAdaptivePolicy
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.tasks import TaskParams

    model_path, onnx_dir = model
    reference = TorchAdaptivePolicy(load_model(model_path))
    ticking, asking = (OnnxAdaptivePolicy(onnx_dir, expected_joint_names=JOINTS,
                                          expected_rate_hz=SETUP.config.control_rate_hz,
                                          expected_window=WINDOW) for _ in range(2))
    assert ticking.contract.latent_dim == 4 and ticking.contract.window_size == WINDOW
    env = ArmTrackingEnv(SETUP)
    obs, _ = env.reset(seed=1, options={"task": TaskParams(payload_mass=2.0)})
    worst = 0.0

    def compare(expected, got) -> None:
        nonlocal worst
        worst = max(worst, float(np.abs(np.asarray(expected) - np.asarray(got)).max()))

    try:
        action = reference.act(obs)
        compare(action, ticking.act(obs))
        compare(action, asking.act(obs))
        for step in range(3 * WINDOW):
            next_obs, reward, _, _, _ = env.step(action)
            for policy in (reference, ticking, asking):
                policy.observe(obs, action, reward, next_obs)
            p_asking = asking.posterior()  # before acting: encoder.onnx
            action = reference.act(next_obs)
            compare(action, ticking.act(next_obs))  # step.onnx
            compare(action, asking.act(next_obs))  # policy.onnx on the updated latent
            p_torch, p_ticking = reference.posterior(), ticking.posterior()
            for p in (p_asking, p_ticking):
                assert p.window_fill == p_torch.window_fill == min(step + 1, WINDOW)
                compare(p_torch.mean, p.mean)
                compare(p_torch.std, p.std)
            obs = next_obs
    finally:
        env.close()
    assert worst <= 1e-5, worst
    # reset forgets the context in all
    for policy in (reference, ticking, asking):
        policy.reset()
    assert ticking.posterior().window_fill == 0
    np.testing.assert_allclose(ticking.posterior().std, 1.0)
    np.testing.assert_allclose(ticking.act(obs), reference.act(obs), atol=1e-5)


def test_context_rate_posterior_is_exact_once_folded_and_the_policy_uses_the_held_latent(model):
    """posterior_update='context': ticks act on the latent of the last update_context; every
    update (every 3rd tick here) gives torch's exact posterior over the last K transitions,
    also after more than a window of transitions queued without one."""
    from metarl_ros.learning.saved_model import load_model
    from metarl_ros.policy.torch_policy import TorchAdaptivePolicy
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.tasks import TaskParams

    model_path, onnx_dir = model
    reference = TorchAdaptivePolicy(load_model(model_path))
    deployed = OnnxAdaptivePolicy(onnx_dir, posterior_update="context")
    with pytest.raises(ValueError, match="posterior_update 'often': expected one of tick"):
        OnnxAdaptivePolicy(onnx_dir, posterior_update="often")
    env = ArmTrackingEnv(SETUP)
    obs, _ = env.reset(seed=2, options={"task": TaskParams(payload_mass=1.0)})
    held = np.zeros(4, np.float32)  # the latent the deployed policy acts on
    worst = 0.0

    def compare_posteriors() -> None:
        nonlocal worst
        p_torch, p_onnx = reference.posterior(), deployed.posterior()
        assert p_onnx.window_fill == p_torch.window_fill
        worst = max(worst, float(np.abs(p_torch.mean - p_onnx.mean).max()),
                    float(np.abs(p_torch.std - p_onnx.std).max()))

    try:
        for step in range(3 * WINDOW):
            with torch.no_grad():
                expected = reference.agent.actor(torch.from_numpy(
                    np.concatenate([obs, held])[None].astype(np.float32)))[0].numpy()
            action = deployed.act(obs)
            worst = max(worst, float(np.abs(expected - action).max()))
            next_obs, reward, _, _, _ = env.step(action)
            reference.observe(obs, action, reward, next_obs)
            deployed.observe(obs, action, reward, next_obs)
            if step % 3 == 2:
                deployed.update_context()
                compare_posteriors()
                held = deployed.posterior().mean
            obs = next_obs
        for _ in range(2 * WINDOW + 1):  # no update for more than a window: the queue overflows
            action = deployed.act(obs)
            next_obs, reward, _, _, _ = env.step(action)
            reference.observe(obs, action, reward, next_obs)
            deployed.observe(obs, action, reward, next_obs)
            obs = next_obs
        compare_posteriors()
    finally:
        env.close()
    assert deployed.posterior().window_fill == WINDOW
    assert worst <= 1e-5, worst


# ------------------------------------------------------------------------------ torch-free


def test_onnx_policy_node_never_imports_torch_pybullet_or_gymnasium(model):
    """The node's module and everything it imports, constructed and ticking, without torch
    and without the simulator's PyBullet and Gymnasium (a robot computer needs none)."""
    _, onnx_dir = model
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import rclpy
        from rclpy.parameter import Parameter
        from metarl_ros.nodes.onnx_policy_node import OnnxPolicyNode, main

        rclpy.init()
        node = OnnxPolicyNode(parameter_overrides=[
            Parameter("model_path", value={str(onnx_dir)!r})])
        setup = node.setup
        q = np.asarray(setup.robot.default_pose)
        zeros = [0.0] * q.size
        names = list(setup.robot.joint_names)
        efforts = []
        for k in range(1, 12):  # more ticks than the context window
            t = 1.0 + 0.01 * k
            node.loop.on_reference(t, t, names, list(q + 0.01), zeros, zeros)
            if node.loop.on_joint_state(t, t, names, list(q), zeros):
                efforts.append(node.loop.tick(t).efforts.tolist())
        node.loop.update_context(1.2)
        node.destroy_node()
        rclpy.shutdown()
        heavy = [m for m in ("torch", "pybullet", "gymnasium") if m in sys.modules]
        print(json.dumps({{"imported": heavy, "ticks": len(efforts),
                          "policy": type(node.policy).__name__,
                          "fill": node.loop.diagnostics(1.2).values["window_fill"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_ros_env(), capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"imported": [], "ticks": 11, "policy": "OnnxAdaptivePolicy",
                      "fill": "8"}


@pytest.mark.parametrize("policy", ["dob", "adaptive_ct"])
def test_the_deployed_node_runs_the_classical_controllers_without_torch(policy):
    """policy:=dob / adaptive_ct on onnx_policy_node: no model, no torch, real commands."""
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import rclpy
        from rclpy.parameter import Parameter
        from metarl_ros.nodes.onnx_policy_node import OnnxPolicyNode

        rclpy.init()
        node = OnnxPolicyNode(parameter_overrides=[Parameter("policy", value={policy!r}),
                                                   Parameter("model_path", value="")])
        setup = node.setup
        q = np.asarray(setup.robot.default_pose)
        zeros = [0.0] * q.size
        names = list(setup.robot.joint_names)
        results = []
        for k in range(1, 6):
            t = 1.0 + 0.01 * k
            node.loop.on_reference(t, t, names, list(q + 0.01), zeros, zeros)
            if node.loop.on_joint_state(t, t, names, list(q), zeros):
                results.append(node.loop.tick(t))
        node.destroy_node()
        rclpy.shutdown()
        print(json.dumps({{"torch": "torch" in sys.modules, "ticks": len(results),
                          "safe": [r.safe for r in results],
                          "moved": float(np.abs(results[-1].efforts).max())}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_ros_env(), capture_output=True,
                          text=True, timeout=90, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch"] is False and result["ticks"] == 5
    assert result["safe"] == [False] * 5 and result["moved"] > 0.1


# ------------------------------------------------------------------------------ start-up refusals


def test_policy_factory_adaptation_switches(model):
    """adaptation=False: the policy never sees a transition (latent at the prior); onnx can
    fold its posterior at the context rate; pearl refuses that, and bad values are named."""
    from metarl_ros.policy.factory import make_policy
    from metarl_ros.policy.frozen_context import FrozenContext

    model_path, onnx_dir = model
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, SETUP.obs_dim)).astype(np.float32)
    action = np.zeros(SETUP.act_dim, np.float32)
    for kind, path in (("onnx", onnx_dir), ("pearl", model_path)):
        frozen = make_policy(kind, SETUP, model_path=path, adaptation=False)
        live = make_policy(kind, SETUP, model_path=path, adaptation=True, maml=False)
        assert isinstance(frozen, FrozenContext) and not isinstance(live, FrozenContext)
        for policy in (frozen, live):
            policy.reset()
            policy.observe(obs[0], action, -1.0, obs[1])
        assert (frozen.posterior().window_fill, live.posterior().window_fill) == (0, 1), kind
        np.testing.assert_allclose(frozen.posterior().mean, 0.0, atol=1e-6)
        assert np.abs(live.posterior().mean).max() > 1e-4, kind
        # the un-adapted policy acts as the live one does on an empty context
        live.reset()
        np.testing.assert_allclose(frozen.act(obs[2]), live.act(obs[2]), atol=1e-5)
    context = make_policy("onnx", SETUP, model_path=onnx_dir, posterior_update="context")
    assert context.posterior_update == "context"
    with pytest.raises(ConfigError, match="posterior_update 'context' applies to policy 'onnx'"):
        make_policy("pearl", SETUP, model_path=model_path, posterior_update="context")
    with pytest.raises(ConfigError, match="adaptation_schedule 'sometimes'"):
        make_policy("pearl", SETUP, model_path=model_path, adaptation_schedule="sometimes")


def _onnx_node(ros, onnx_dir, **overrides):
    values = {"model_path": str(onnx_dir), "use_sim_time": False}
    values.update(overrides)
    return OnnxPolicyNode(context=ros.context, parameter_overrides=params(**values))


def test_refuses_to_start_on_contract_mismatch_or_bad_files(ros, model, tmp_path):
    _, onnx_dir = model
    policy_file = onnx_dir / "policy.onnx"
    cases = [
        ({"context_window": 25}, ModelContractError, ["context window 8", "configured 25"]),
        ({"control_rate_hz": 500.0}, ModelContractError,
         ["control rate 100 Hz", "configured 500 Hz"]),
        ({"joint_names": list(reversed(JOINTS))}, ModelContractError,
         ["do not match the configured joints", "order matters", "joint_map"]),
        ({"joint_names": ROBOT_JOINTS}, ModelContractError, ["arm_joint_1"]),
        ({"model_path": str(tmp_path / "missing")}, ModelContractError,
         ["policy.onnx: model file not found"]),
        ({"joint_map": ["lbr_iiwa_joint_9:x"]}, ConfigError,
         ["'lbr_iiwa_joint_9' is not a joint of the model"]),
        ({"controller_joints": ROBOT_JOINTS}, ConfigError, ["controller_joints", "unknown"]),
    ]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "policy.onnx").write_bytes(policy_file.read_bytes()[: 300])
    cases.append(({"model_path": str(corrupt)}, ModelContractError, ["not a loadable ONNX"]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    _strip_contract(policy_file, foreign / "policy.onnx")
    cases.append(({"model_path": str(foreign)}, ModelContractError,
                  ["no metarl_ros contract", "metarl export"]))
    old = tmp_path / "old_format"
    old.mkdir()
    _set_metadata(policy_file, old / "policy.onnx", contract_version="1")
    cases.append(({"model_path": str(old)}, ModelContractError,
                  ["contract version 1 is not supported (expected 2)", "metarl export"]))
    other_env = tmp_path / "env.yaml"
    _env_with(other_env, observation={"position_error_scale": 1.0})
    cases.append(({"env_config": str(other_env)}, ConfigError,
                  ["observation.position_error_scale"]))
    for overrides, error, fragments in cases:
        with pytest.raises(error) as info:
            _onnx_node(ros, onnx_dir, **overrides)
        for fragment in fragments:
            assert fragment in str(info.value), (overrides, str(info.value))
    # onnx_policy_node runs nothing but onnx (pearl would import torch)
    with pytest.raises(ValueError, match="must be one of onnx"):
        _onnx_node(ros, onnx_dir, policy="pearl")


def _strip_contract(source: Path, target: Path) -> None:
    import onnx

    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    onnx.save(proto, str(target))


def _set_metadata(source: Path, target: Path, **values: str) -> None:
    import onnx

    proto = onnx.load(str(source))
    for entry in proto.metadata_props:
        if entry.key in values:
            entry.value = values[entry.key]
    onnx.save(proto, str(target))


def test_export_replaces_a_previous_export_and_nothing_else(model, tmp_path):
    """Re-exporting into the same directory (the documented `metarl export --out
    models/pearl/onnx`) replaces it whole; a folder holding anything else is left alone."""
    from metarl_ros.policy.onnx_export import ExportError, export_model

    model_path, _ = model
    out = tmp_path / "export"
    export_model(model_path, out)
    (out / "policy.onnx").write_bytes(b"stale")
    summary = export_model(model_path, out)
    assert summary["files"] == ["encoder.onnx", "policy.onnx", "step.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*summary["files"], "export.json"])
    assert OnnxAdaptivePolicy(out).contract.window_size == WINDOW  # the stale file is gone
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging left behind
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(model_path, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "policy.onnx").is_file()


def test_export_parity_gate_is_relative_above_one_and_writes_nothing_past_it(
        model, tmp_path, monkeypatch):
    """The gate bounds |onnx - torch| / (1 + |torch|): a float32 variance of 80 off by a few
    ulps (4e-5 absolute) passes, a scaled difference above 1e-5 refuses the export whole."""
    from metarl_ros.policy import onnx_export as export

    model_path, _ = model
    real = export.check_parity
    seen = []

    def spy(loaded, out_dir, **kwargs):
        seen.append(real(loaded, out_dir, **kwargs))
        return seen[-1]

    monkeypatch.setattr(export, "check_parity", spy)
    summary = export.export_model(model_path, tmp_path / "real")
    worst, scaled = seen[0]
    assert 0 < scaled <= worst  # the scaled difference never exceeds the absolute one
    assert (summary["max_abs_diff"], summary["max_scaled_diff"]) == (worst, scaled)

    monkeypatch.setattr(export, "check_parity", lambda loaded, out_dir, **kw: (4e-5, 5e-7))
    assert export.export_model(model_path, tmp_path / "large")["max_abs_diff"] == 4e-5
    monkeypatch.setattr(export, "check_parity", lambda loaded, out_dir, **kw: (3e-5, 2e-5))
    with pytest.raises(export.ExportError, match=r"2.00e-05 \(\|onnx - torch\| / \(1 \+"):
        export.export_model(model_path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _env_with(path: Path, **changes) -> None:
    import yaml

    data = yaml.safe_load(SETUP.path.read_text())
    data["robot"] = str(SETUP.robot_path)
    data["tasks"] = str((SETUP.path.parent / data["tasks"]).resolve())
    for key, value in changes.items():
        data[key] = {**data[key], **value}
    path.write_text(yaml.safe_dump(data))


def test_refusal_exits_nonzero_with_one_clear_line(model, tmp_path):
    """As an executable: the message, exit code 1, no traceback."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "policy.onnx").write_bytes(b"\x00not an onnx model" * 20)
    proc = subprocess.run(
        [sys.executable, "-m", "metarl_ros.nodes.onnx_policy_node", "--ros-args",
         "--params-file", str(REPO / "config" / "onnx_policy_node.yaml"),
         "-p", f"model_path:={corrupt}"],
        env=_ros_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "ModelContractError" in out and f"{corrupt / 'policy.onnx'}: not a loadable ONNX" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------------ closed loop


def _closed_loop(ros, node) -> tuple[np.ndarray, TrackingMonitor, object]:
    """Run ``node`` against sim_node (lockstep, default scenario); the efforts it sent, one row
    per instant answered, in time order."""
    probe = ros.add(Node("probe_deploy", context=ros.context))
    monitor = TrackingMonitor(probe)
    ros.add(node)
    sent: dict[int | None, np.ndarray] = {}
    publish = node.commands.publish

    def recording_publish(efforts, position, stamp_ns=None, **kwargs):
        efforts = np.array(efforts, dtype=np.float64)
        if stamp_ns in sent:  # t = 0 re-published before the first answer reached the sim
            np.testing.assert_array_equal(efforts, sent[stamp_ns])  # answered identically
        sent.setdefault(stamp_ns, efforts)
        return publish(efforts, position, stamp_ns=stamp_ns, **kwargs)

    node.commands.publish = recording_publish
    sim = ros.add(SimNode(context=ros.context, parameter_overrides=params(
        real_time_factor=0.0, scenario=SCENARIO, duration_s=RUN_S)))
    assert wait_for(sim.finished.is_set, 120.0), f"sim stuck at t={sim.sim.time_s}"
    assert sim.lockstep_timeouts == 0 and sim.commands_rejected == 0
    stats = node.loop.stats
    ros.remove_all()
    assert None not in sent  # every command answered an instant (no watchdog command)
    return np.array([sent[k] for k in sorted(sent)]), monitor, stats


def test_deploy_node_drives_the_sim_like_the_torch_node(ros, model):
    """Default scenario in lockstep, same model: onnx_policy_node vs adapter_node (pearl).

    Tolerance: lockstep makes each run deterministic, so the only difference is float32
    arithmetic in onnxruntime vs torch (<= 1e-5 on actions and posterior, see the parity
    test). Through the closed loop (PD-stabilized, so contractive) that stays at rounding
    level: per-step efforts within 1e-3 N*m of torch's (limits are 40..320 N*m) and the
    tracking-error trace within 1e-5 rad, over all 800 steps and both faults. Measured here:
    3.6e-6 N*m and 6e-9 rad, so the bounds leave ~300x margin for other CPUs' rounding while
    any real difference (wrong latent, joint order, window) shows up as >= 0.1 N*m.
    """
    model_path, onnx_dir = model
    torch_node = AdapterNode(context=ros.context, parameter_overrides=params(
        use_sim_time=True, policy="pearl", model_path=str(model_path), maml=False))
    torch_efforts, torch_monitor, torch_stats = _closed_loop(ros, torch_node)
    onnx_node = OnnxPolicyNode(context=ros.context, parameter_overrides=params(
        use_sim_time=True, model_path=str(onnx_dir), context_window=WINDOW))
    onnx_efforts, onnx_monitor, onnx_stats = _closed_loop(ros, onnx_node)

    steps = int(RUN_S * SETUP.config.control_rate_hz)
    for stats in (torch_stats, onnx_stats):
        assert stats.policy_ticks == steps and stats.safe_ticks == 0 and stats.policy_errors == 0
    assert torch_efforts.shape == onnx_efforts.shape == (steps, N)
    assert np.abs(onnx_efforts).max() > 1.0  # the arm is actually driven
    effort_diff = float(np.abs(onnx_efforts - torch_efforts).max())
    assert effort_diff <= 1e-3, effort_diff
    common = sorted(set(torch_monitor.states) & set(onnx_monitor.states)
                    & set(torch_monitor.references))
    assert len(common) > 0.95 * steps
    error_torch = np.array([np.linalg.norm(torch_monitor.references[k] - torch_monitor.states[k])
                            for k in common])
    error_onnx = np.array([np.linalg.norm(onnx_monitor.references[k] - onnx_monitor.states[k])
                           for k in common])
    tracking_diff = float(np.abs(error_onnx - error_torch).max())
    print(f"onnx vs torch over {steps} steps: efforts max |diff| {effort_diff:.2e} N*m, "
          f"tracking error max |diff| {tracking_diff:.2e} rad (mean error "
          f"{error_onnx.mean():.4f} rad)")
    assert tracking_diff <= 1e-5, tracking_diff
    assert np.isfinite(error_onnx).all()


# ------------------------------------------------------------------------------ robot I/O


class FakeRobot:
    """Publishes the robot's (differently named) joint states and reference; collects commands."""

    def __init__(self, node: Node, command_type: type, topic: str) -> None:
        self.node = node
        self.states = node.create_publisher(JointState, "/joint_states", STATE_QOS)
        self.refs = node.create_publisher(JointState, "/reference", STATE_QOS)
        self.commands = Collector()
        qos = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)  # as ros2_control subscribes
        node.create_subscription(command_type, topic, self.commands, qos)
        self.topic = topic
        # stamped like a robot's driver: on the wall clock, as the node's own clock
        self.t_ns = node.get_clock().now().nanoseconds

    def connected(self) -> bool:
        return (self.states.get_subscription_count() > 0
                and self.refs.get_subscription_count() > 0
                and self.node.count_publishers(self.topic) > 0)

    def send(self, names, position, velocity, ref_names, ref) -> None:
        self.t_ns += 10_000_000
        stamp = ns_to_stamp(self.t_ns)
        msg = JointState(name=list(ref_names), position=list(ref[0]), velocity=list(ref[1]),
                         effort=list(ref[2]))
        msg.header.stamp = stamp
        self.refs.publish(msg)
        msg = JointState(name=list(names), position=list(position), velocity=list(velocity))
        msg.header.stamp = stamp
        self.states.publish(msg)


def _robot_reading():
    rng = np.random.default_rng(4)
    q = np.asarray(SETUP.robot.default_pose) + rng.normal(0, 0.05, N)
    qd = rng.normal(0, 0.1, N)
    ref = (q + 0.03, np.full(N, 0.1), np.zeros(N))
    return q, qd, ref


def _expected_first_efforts(onnx_dir, q, qd, ref) -> np.ndarray:
    """The first tick's efforts (model order): the shared observation/effort functions."""
    policy = OnnxAdaptivePolicy(onnx_dir)
    obs = build_observation(SETUP.law, q, qd, ref, np.zeros(N, dtype=np.float32))
    action = np.clip(policy.act(obs), -1.0, 1.0)
    efforts = effort_command(SETUP.law, action, q, qd, ref)
    limits = np.asarray(SETUP.robot.effort_limits)
    return np.clip(efforts, -limits, limits)


def test_joint_map_reads_robot_names_and_orders_commands_for_the_controller(ros, model):
    _, onnx_dir = model
    probe = ros.add(Node("robot", context=ros.context))
    robot = FakeRobot(probe, Float64MultiArray, "/arm_controller/commands")
    controller_joints = list(reversed(ROBOT_JOINTS))  # the controller lists its joints 7..1
    ros.add(_onnx_node(ros, onnx_dir, joint_map=JOINT_MAP, controller_joints=controller_joints,
                       controller_name="arm_controller", watchdog_timeout=5.0))
    assert wait_for(robot.connected, 10.0)
    q, qd, ref = _robot_reading()
    order = np.random.default_rng(1).permutation(N)
    # shuffled robot names, plus an extra joint that carries a *model* name: it is not the
    # model's joint (joint_map says lbr_iiwa_joint_1 is arm_joint_1) and must be ignored
    names = [ROBOT_JOINTS[i] for i in order] + ["lbr_iiwa_joint_1"]
    robot.send(names, list(q[order]) + [float("nan")], list(qd[order]) + [0.0],
               ROBOT_JOINTS, ref)
    assert wait_for(lambda: len(robot.commands) >= 1, 10.0)
    expected = _expected_first_efforts(onnx_dir, q, qd, ref)
    np.testing.assert_allclose(robot.commands.snapshot()[0].data, expected[::-1], rtol=1e-5,
                               atol=1e-5)
    # model names on /joint_states are not the robot's: rejected, counted
    node = [n for n in ros._nodes if isinstance(n, OnnxPolicyNode)][0]
    robot.send(JOINTS, list(q), list(qd), ROBOT_JOINTS, ref)
    assert wait_for(lambda: node.loop.stats.rejected_joint_states == 1, 5.0)
    assert node.loop.stats.rejections_by_reason == {"joint_state:missing_joints": 1}
    ros.remove_all()


def test_trajectory_command_type_publishes_a_valid_joint_trajectory(ros, model):
    """The shape joint_trajectory_controller (effort interface, zero gains) accepts:
    joint names, one point with positions and efforts for every joint, zero stamp and time."""
    _, onnx_dir = model
    probe = ros.add(Node("robot", context=ros.context))
    robot = FakeRobot(probe, JointTrajectory, "/arm_controller/joint_trajectory")
    controller_joints = [ROBOT_JOINTS[i] for i in (3, 0, 6, 1, 5, 2, 4)]
    ros.add(_onnx_node(ros, onnx_dir, command_type="trajectory", joint_map=JOINT_MAP,
                       controller_joints=controller_joints, controller_name="arm_controller",
                       watchdog_timeout=5.0))
    assert wait_for(robot.connected, 10.0)
    q, qd, ref = _robot_reading()
    robot.send(ROBOT_JOINTS, q, qd, [], ref)  # an unnamed reference: model order
    assert wait_for(lambda: len(robot.commands) >= 1, 10.0)
    msg = robot.commands.snapshot()[0]
    index = [ROBOT_JOINTS.index(name) for name in controller_joints]
    assert list(msg.joint_names) == controller_joints
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (0, 0)  # start now
    assert len(msg.points) == 1
    point = msg.points[0]
    assert (point.time_from_start.sec, point.time_from_start.nanosec) == (0, 0)
    assert len(point.positions) == len(point.effort) == N
    assert len(point.velocities) == 0 and len(point.accelerations) == 0
    np.testing.assert_allclose(point.positions, q[index])
    expected = _expected_first_efforts(onnx_dir, q, qd, ref)
    np.testing.assert_allclose(point.effort, expected[index], rtol=1e-5, atol=1e-5)
    ros.remove_all()


def test_joint_map_parsing():
    joint_map = JointMap(JOINTS, JOINT_MAP[:2])
    assert joint_map.robot_names == (*ROBOT_JOINTS[:2], *JOINTS[2:])
    assert list(joint_map.to_model(["arm_joint_2", "x", JOINTS[3]])) == [
        JOINTS[1], "x (not in joint_map)", JOINTS[3]]
    assert JointMap(JOINTS).identity
    for pairs, needle in (([" : x"], "expected 'model_joint:robot_joint'"),
                          ([f"{JOINTS[0]}:a", f"{JOINTS[0]}:b"], "twice"),
                          ([f"{JOINTS[0]}:a", f"{JOINTS[1]}:a"], "same robot name: a"),
                          ([f"{JOINTS[0]}:{JOINTS[1]}"], f"same robot name: {JOINTS[1]}")):
        with pytest.raises(ConfigError, match=needle):
            JointMap(JOINTS, pairs)
    names, order = JointMap(JOINTS, JOINT_MAP).command_order(list(reversed(ROBOT_JOINTS)))
    assert list(order) == list(range(N - 1, -1, -1)) and names[0] == ROBOT_JOINTS[-1]
    with pytest.raises(ConfigError, match="missing"):
        JointMap(JOINTS).command_order(JOINTS[:-1])


# ------------------------------------------------------------------------------ launch graphs


def test_deploy_graph_and_adapt_sim_with_onnx():
    graph = deploy_graph()
    assert [n.name for n in graph.nodes] == ["onnx_policy_node"]
    node = graph.node("onnx_policy_node")
    assert node.executable == "onnx_policy_node" and node.remappings == ()
    assert node.parameter_files == ("config/onnx_policy_node.yaml",)
    assert node.parameters["model_path"] == "models/pearl/onnx"
    assert node.parameters["use_sim_time"] is False
    graph = deploy_graph({"joint_states": "/robot/joint_states", "command_type": "trajectory",
                          "controller": "arm_controller", "command_topic": "/arm/cmd",
                          "params_file": "my_robot.yaml", "effort_limit_scale": "0.25"})
    node = graph.node("onnx_policy_node")
    assert node.remappings == (("/joint_states", "/robot/joint_states"),
                               ("/arm_controller/joint_trajectory", "/arm/cmd"))
    assert node.parameter_files[-1] == "my_robot.yaml"
    assert node.parameters["effort_limit_scale"] == 0.25
    assert node.parameters["command_type"] == "trajectory"
    with pytest.raises(ValueError, match="expected one of effort, trajectory"):
        deploy_graph({"command_type": "position"})
    with pytest.raises(ValueError, match="effort_limit_scale"):
        deploy_graph({"effort_limit_scale": "2"})

    sim = adapt_sim_graph({"policy": "onnx", "record": "true", "adaptation": "false"})
    assert [n.name for n in sim.nodes] == ["recorder_node", "sim_node", "onnx_policy_node"]
    assert sim.node("onnx_policy_node").parameters["model_path"] == "models/pearl/onnx"
    assert "/onnx_policy_node/latent" in sim.node("recorder_node").parameters["topics"]
    assert sim.node("onnx_policy_node").parameters["adaptation"] is False
    assert sim.notes == ("record:=true: recorder_node writes rosbag2_<date-time>",)
    assert any("MAML needs gradients" in note
               for note in adapt_sim_graph({"policy": "onnx"}).notes)
    chosen = adapt_sim_graph({"policy": "onnx", "model": "/x/export"})
    assert chosen.node("onnx_policy_node").parameters["model_path"] == "/x/export"


def test_deploy_launch_file_against_stand_in_launch_api(monkeypatch):
    values = {arg.name: arg.default for arg in DEPLOY_ARGUMENTS}
    values.update(joint_states="/robot/joint_states", command_type="trajectory")
    description = stand_in_launch_description(monkeypatch, "deploy", values)
    declared = [a for a in description if type(a).__name__ == "DeclareLaunchArgument"]
    assert [a.args[0] for a in declared] == [arg.name for arg in DEPLOY_ARGUMENTS]
    opaque = [a for a in description if type(a).__name__ == "OpaqueFunction"][0]
    nodes = [a for a in opaque.kwargs["function"](values) if type(a).__name__ == "Node"]

    def unwrap(v):
        return v.value if type(v).__name__ == "ParameterValue" else v

    _check_nodes_against_graph(nodes, deploy_graph(values), unwrap)
    assert nodes[0].kwargs["remappings"] == [("/joint_states", "/robot/joint_states")]


def test_onnx_node_parameter_file_matches_its_declarations(ros, model):
    import yaml

    _, onnx_dir = model
    path = parameter_file_path("config/onnx_policy_node.yaml")
    data = yaml.safe_load(Path(path).read_text())["onnx_policy_node"]["ros__parameters"]
    node = OnnxPolicyNode(context=ros.context, cli_args=["--ros-args", "--params-file", path],
                          parameter_overrides=[Parameter("model_path", value=str(onnx_dir))])
    try:
        for key, value in data.items():
            assert node.has_parameter(key), f"{path}: {key} is not a parameter"
            assert type(node.get_parameter(key).value) is type(value), key
        assert node.get_parameter("command_type").value == "effort"
    finally:
        node.destroy_node()


def test_metarl_launch_deploy_runs_and_stops(model):
    _, onnx_dir = model
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "metarl_ros.cli.launch", "deploy", f"model:={onnx_dir}",
         "joint_states:=/robot/joint_states", "--duration", "1.0"],
        env=_ros_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # the deploy file acts ahead of the joint state, and this export says its actor sees the
    # reference view only (the default agent config, as the shipped models)
    assert "policy 'onnx' (OnnxAdaptivePolicy, acting ahead of the joint state)" in out
    assert "onnx_policy_node: ticks 0" in out  # no robot on this domain: nothing to control
    assert "Traceback" not in out
    assert time.monotonic() - start < 45


# ------------------------------------------------------------------------------ context-free


@pytest.fixture(scope="module")
def robust_model(tmp_path_factory) -> Path:
    """A tiny model without context encoder (method robust), untrained."""
    from metarl_ros.learning.config import AgentConfig, DynamicsConfig, TrainConfig
    from metarl_ros.learning.trainer import Trainer

    root = tmp_path_factory.mktemp("robust_model")
    config = TrainConfig(
        method="robust", env=str(SETUP.path), seed=5, total_iterations=1, envs_per_iteration=1,
        updates_per_iteration=1, meta_batch_tasks=1, batch_size=8, eval_tasks=1,
        eval_every_iterations=100, replay_capacity_per_task=100, initial_episodes_per_task=1,
        torch_threads=1, agent=AgentConfig(actor_hidden=[32, 32], critic_hidden=[32, 32]),
        dynamics=DynamicsConfig(enabled=False))
    return Trainer(config, root / "run", progress=False).write_final_model()


def test_a_context_free_model_exports_and_runs_without_a_latent(robust_model, tmp_path):
    """`metarl export` on a robust/nominal model used to crash on its missing encoder."""
    from metarl_ros.policy.onnx_export import export_model

    summary = export_model(robust_model, tmp_path / "onnx")
    assert summary["method"] == "robust"
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["export.json",
                                                                       "policy.onnx"]
    assert summary["max_scaled_diff"] <= 1e-5
    policy = OnnxAdaptivePolicy(tmp_path / "onnx")
    obs = np.zeros(policy.contract.obs_dim, np.float32)
    action = policy.act(obs)
    assert action.shape == (N,) and np.isfinite(action).all()
    policy.observe(obs, action, 0.0, obs)
    assert policy.posterior().mean.size == 0


def test_policy_pearl_refuses_a_context_free_model(robust_model):
    """policy:=pearl maml:=false on a robust model ran and called itself PEARL."""
    from metarl_ros.policy.factory import make_policy

    for maml in (False, True):
        with pytest.raises(ConfigError, match="a 'robust' model, without the context encoder"):
            make_policy("pearl", SETUP, model_path=robust_model, maml=maml)
