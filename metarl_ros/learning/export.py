"""``metarl export``: ONNX graphs of a trained model, with its contract, checked against torch.

Two graphs (opset :data:`OPSET`, CPU, float32, batch dimension fixed to 1 -- one robot):

``encoder.onnx`` -- one streaming-posterior tick, the product of Gaussians included:

=============== ============ ===========================================================
input           shape        meaning
=============== ============ ===========================================================
transition      (1, D)       newest ``(s, a, r, s')``, D = 2*obs_dim + act_dim + 1
window_mean     (K-1, L)     factor means of the previous K-1 transitions (oldest first)
window_var      (K-1, L)     their variances
window_mask     (K-1,)       1 where a slot holds a factor, 0 where the window is not full
=============== ============ ===========================================================

outputs: ``factor_mean`` (1, L), ``factor_var`` (1, L) -- the new transition's factor, to be
appended to the window by the caller -- and ``posterior_mean`` (1, L), ``posterior_std`` (1, L),
the product over the window including the new factor (exactly the torch streaming posterior).

``policy.onnx`` -- ``obs`` (1, obs_dim), ``latent`` (1, L) -> ``action`` (1, act_dim), the
deterministic action ``tanh(mean)`` in [-1, 1].

The contract travels in both files' ``metadata_props`` (JSON values): joint names in order,
observation layout and scales, default pose, PD feedback gains, action scale, effort limits,
control rate, window size, latent size, model format version and the training config hash.
Export runs both graphs in onnxruntime on random and recorded inputs and refuses to write
anything if any output differs from torch by more than :data:`PARITY_TOLERANCE`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metarl_ros.learning.checkpoint import CheckpointError
from metarl_ros.learning.encoder import ContextEncoder, product_of_gaussians
from metarl_ros.learning.runtime import LoadedModel, load_model
from metarl_ros.sim.env import load_env_setup

OPSET = 17
PARITY_TOLERANCE = 1e-5
CONTRACT_VERSION = 1


class ExportError(CheckpointError):
    """The model cannot be exported faithfully."""


class EncoderTick(nn.Module):
    """New factor for one transition and the product over it and the previous K-1 factors."""

    def __init__(self, encoder: ContextEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, transition, window_mean, window_var, window_mask):
        mu, var = self.encoder.factors(transition)  # (1, L)
        all_mu = torch.cat([window_mean, mu], dim=0)
        all_var = torch.cat([window_var, var], dim=0)
        mask = torch.cat([window_mask, torch.ones_like(window_mask[:1])], dim=0)
        mean, post_var = product_of_gaussians(all_mu, all_var, mask)
        return mu, var, mean.unsqueeze(0), post_var.sqrt().unsqueeze(0)


class PolicyGraph(nn.Module):
    def __init__(self, actor: nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs, latent):
        return self.actor(torch.cat([obs, latent], dim=-1))


def export_contract(loaded: LoadedModel) -> dict[str, str]:
    """The metadata_props of both graphs (values are JSON strings)."""
    payload = loaded.payload
    setup = load_env_setup(payload["env_config"])
    contract = dict(payload["contract"])
    contract["feedback"] = setup.config.feedback.model_dump()
    contract["observation_layout"] = [
        "q - default_pose",
        "qd * velocity_scale",
        "(q_ref - q) * position_error_scale",
        "(qd_ref - qd) * velocity_error_scale",
        "qd_ref * velocity_scale",
        "qdd_ref * acceleration_scale",
        "previous action",
    ]
    contract["effort"] = "kp * (q_ref - q) + kd * (qd_ref - qd) + action * action_scale"
    props = {key: json.dumps(value) for key, value in contract.items()}
    props.update(
        {
            "contract_version": json.dumps(CONTRACT_VERSION),
            "model_format_version": json.dumps(payload["format_version"]),
            "config_hash": json.dumps(payload["config_hash"]),
            "method": json.dumps(loaded.method),
            "opset": json.dumps(OPSET),
        }
    )
    return props


def _add_metadata(path: Path, props: dict[str, str], doc: str) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = doc
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _recorded_inputs(loaded: LoadedModel, steps: int = 60) -> list[dict[str, np.ndarray]]:
    """Real transitions from a short simulated episode (with a payload) for the parity check."""
    from metarl_ros.learning.runtime import TorchAdaptivePolicy
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.tasks import TaskParams

    setup = load_env_setup(loaded.payload["env_config"])
    env = ArmTrackingEnv(setup)
    policy = TorchAdaptivePolicy(loaded)
    obs, _ = env.reset(seed=7, options={"task": TaskParams(payload_mass=2.0)})
    records = []
    for _ in range(steps):
        action = policy.act(obs)
        next_obs, reward, _, _, _ = env.step(action)
        records.append({"obs": obs, "action": action, "reward": reward, "next_obs": next_obs})
        policy.observe(obs, action, reward, next_obs)
        obs = next_obs
    env.close()
    return records


def check_parity(
    loaded: LoadedModel,
    encoder_path: Path | None,
    policy_path: Path,
    samples: int = 20,
    seed: int = 0,
) -> float:
    """Max abs difference between torch and onnxruntime over random and recorded inputs."""
    agent = loaded.agent
    spec = agent.spec
    rng = np.random.default_rng(seed)
    policy_session = _session(policy_path)
    latent_dim = spec.latent_dim if encoder_path is not None else 0
    worst = 0.0
    records = _recorded_inputs(loaded)
    obs_batch = [rng.normal(size=(1, spec.obs_dim)).astype(np.float32) for _ in range(samples)]
    obs_batch += [r["obs"][None].astype(np.float32) for r in records]
    for obs in obs_batch:
        latent = rng.normal(size=(1, latent_dim)).astype(np.float32)
        expected = PolicyGraph(agent.actor)(torch.from_numpy(obs), torch.from_numpy(latent))
        got = (
            policy_session.run(None, {"obs": obs, "latent": latent})[0]
            if latent_dim
            else policy_session.run(None, {"obs": obs})[0]
        )
        worst = max(worst, float(np.abs(expected.detach().numpy() - got).max()))
    if encoder_path is not None:
        k = loaded.contract.window_size
        session = _session(encoder_path)
        tick = EncoderTick(agent.encoder)
        cases = []
        for _ in range(samples):
            cases.append(
                (
                    rng.normal(size=(1, spec.transition_dim)),
                    rng.normal(size=(k - 1, latent_dim)),
                    rng.uniform(0.01, 2.0, size=(k - 1, latent_dim)),
                    (rng.random(k - 1) < rng.random()).astype(np.float64),
                )
            )
        # recorded: a real window, as the deployed node would hold it
        with torch.no_grad():
            for i in range(k, len(records)):
                window = records[i - k + 1 : i + 1]
                transitions = np.stack(
                    [
                        np.concatenate([r["obs"], r["action"], [r["reward"]], r["next_obs"]])
                        for r in window
                    ]
                )
                mu, var = agent.encoder.factors(torch.from_numpy(transitions).float())
                cases.append((transitions[-1:], mu[:-1].numpy(), var[:-1].numpy(), np.ones(k - 1)))
        for transition, w_mean, w_var, w_mask in cases:
            inputs = {
                "transition": transition.astype(np.float32),
                "window_mean": w_mean.astype(np.float32),
                "window_var": w_var.astype(np.float32),
                "window_mask": w_mask.astype(np.float32),
            }
            with torch.no_grad():
                expected = tick(*(torch.from_numpy(v) for v in inputs.values()))
            got = session.run(None, inputs)
            for e, g in zip(expected, got):
                worst = max(worst, float(np.abs(e.numpy() - g).max()))
    return worst


def export_model(model_path: str | Path, out_dir: str | Path) -> dict:
    """Export, check parity, then publish ``out_dir`` atomically. Returns a summary."""
    loaded = load_model(model_path)
    spec = loaded.agent.spec
    if spec.conditioning == "oracle":
        raise ExportError(f"{loaded.path}: the oracle needs the true task; it cannot be deployed")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        props = export_contract(loaded)
        latent_dim = spec.latent_dim if spec.conditioning == "latent" else 0
        policy_path = staging / "policy.onnx"
        obs = torch.zeros(1, spec.obs_dim)
        latent = torch.zeros(1, latent_dim)
        with torch.no_grad():
            torch.onnx.export(
                PolicyGraph(loaded.agent.actor).eval(),
                (obs, latent),
                str(policy_path),
                input_names=["obs", "latent"] if latent_dim else ["obs"],
                output_names=["action"],
                opset_version=OPSET,
                dynamo=False,
            )
        _add_metadata(policy_path, props, "metarl_ros policy: obs, latent -> action in [-1, 1]")
        encoder_path = None
        if latent_dim:
            k = loaded.contract.window_size
            encoder_path = staging / "encoder.onnx"
            example = (
                torch.zeros(1, spec.transition_dim),
                torch.zeros(k - 1, latent_dim),
                torch.ones(k - 1, latent_dim),
                torch.zeros(k - 1),
            )
            with torch.no_grad():
                torch.onnx.export(
                    EncoderTick(loaded.agent.encoder).eval(),
                    example,
                    str(encoder_path),
                    input_names=["transition", "window_mean", "window_var", "window_mask"],
                    output_names=["factor_mean", "factor_var", "posterior_mean", "posterior_std"],
                    opset_version=OPSET,
                    dynamo=False,
                )
            _add_metadata(
                encoder_path,
                props,
                "metarl_ros PEARL encoder tick: new factor + product of Gaussians",
            )
        worst = check_parity(loaded, encoder_path, policy_path)
        if not worst <= PARITY_TOLERANCE:
            raise ExportError(
                f"{loaded.path}: ONNX outputs differ from torch by {worst:.2e} "
                f"(> {PARITY_TOLERANCE:.0e}); nothing written"
            )
        summary = {
            "model": str(loaded.path),
            "method": loaded.method,
            "opset": OPSET,
            "max_abs_diff": worst,
            "files": sorted(p.name for p in staging.iterdir()),
        }
        (staging / "export.json").write_text(json.dumps(summary, indent=2))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
