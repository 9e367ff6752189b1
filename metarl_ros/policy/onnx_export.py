"""``metarl export``: ONNX graphs of a trained model, with its contract, checked against torch.

Three graphs (opset :data:`OPSET`, CPU, float32, batch dimension fixed to 1 -- one robot). A
PEARL posterior is a product of Gaussian factors; the graphs carry each factor in the
**precision form** ``(1/var, mu/var)``, in which the product over a window is two sums::

    precision = sum_n 1/var_n          mean = (sum_n mu_n/var_n) / precision

so the deployed runtime keeps a ring of the previous ``K - 1`` factors in that form (empty slots
are zeros: a masked product for free) and a graph adds the newest factor to the sums. This is
exactly :func:`~metarl_ros.learning.encoder.product_of_gaussians` over the last ``K``
transitions (the torch streaming posterior), up to float32 summation order.

``encoder.onnx`` -- one streaming-posterior tick:

================== ============ ========================================================
input              shape        meaning
================== ============ ========================================================
transition         (1, D)       newest ``(s, a, r, s')``, D = 2*obs_dim + act_dim + 1
window_precision   (K-1, L)     ``1/var`` of the previous K-1 factors (0 = empty slot)
window_weighted    (K-1, L)     ``mu/var`` of the same factors (0 = empty slot)
================== ============ ========================================================

outputs: ``factor_precision``, ``factor_weighted`` (1, L) -- the new transition's factor, which
the caller writes over the oldest slot of its ring -- and ``posterior_mean``, ``posterior_std``
(1, L), the product over the window including the new factor.

``policy.onnx`` -- ``obs`` (1, obs_dim), ``latent`` (1, L) -> ``action`` (1, act_dim), the
deterministic action ``tanh(mean)`` in [-1, 1] (the head's log-std rows are left out).

``step.onnx`` -- one control tick in one call, what the deployed node runs (one
``session.run`` costs ~3 us before any work, so a tick pays it once): the inputs of
``encoder.onnx`` plus ``obs`` (the observation to act on, normally the transition's ``s'``);
outputs ``factor_precision``, ``factor_weighted``, ``posterior_mean``, ``posterior_precision``
(``1/std**2``, (1, L)) and ``action`` -- ``policy(obs, posterior_mean)`` of the updated
posterior. Models without a latent get ``policy.onnx`` only (``latent`` input dropped).

The contract travels in every file's ``metadata_props`` (JSON values): joint names in order,
observation layout and scales, default pose, PD feedback gains, action scale, effort limits,
control rate, window size, latent size, the actor's view (``actor_view``: ``reference`` lets a
node act before the joint state arrives, ``act_ahead``), the contract (graph interface)
version, model format version and the training config hash. Export runs every graph in
onnxruntime on random and recorded inputs and refuses to write anything if any output differs
from the torch model's by more than :data:`PARITY_TOLERANCE`, absolute for values up to 1 and
relative above (``|onnx - torch| / (1 + |torch|)``: float32 carries 7 digits, and a factor
variance of 80 is only known to 1e-5 absolute); factors are compared as mean and variance, the
posterior as mean and std.
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
from torch.nn import functional as F

from metarl_ros.core.files import make_staging_dir
from metarl_ros.learning.checkpoint import CheckpointError, model_env_config
from metarl_ros.learning.encoder import ContextEncoder, product_of_gaussians
from metarl_ros.control.model_features import FEATURE_NAMES
from metarl_ros.learning.networks import TanhGaussianActor
from metarl_ros.learning.saved_model import LoadedModel, load_model
from metarl_ros.sim.env_config import load_env_setup

OPSET = 17
PARITY_TOLERANCE = 1e-5
"""Bound on ``|onnx - torch| / (1 + |torch|)`` over every output of every parity input."""
CONTRACT_VERSION = 2
"""2: factors in precision form, ``step.onnx`` (1: mean/var/mask window, two graphs)."""
EXPORT_FILES = ("encoder.onnx", "export.json", "policy.onnx", "step.onnx")
"""everything ``metarl export`` writes; an existing export directory is replaced only if it
holds nothing else."""


class ExportError(CheckpointError):
    """The model cannot be exported faithfully."""


class FactorGraph(nn.Module):
    """transition (1, D) -> the encoder's factor in precision form: ``1/var``, ``mu/var``."""

    def __init__(self, encoder: ContextEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, transition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, var = self.encoder.factors(transition)
        precision = torch.reciprocal(var)
        return precision, precision * mu


class WindowProduct(nn.Module):
    """Product of the new factor with a window of ``rows`` held ones, in precision form.

    ``ones @ window + new`` is one Gemm per sum (onnxruntime pays per node, not per flop).
    Returns the posterior mean and precision, each (1, L).
    """

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.register_buffer("ones", torch.ones(1, rows))

    def forward(self, precision, weighted, window_precision, window_weighted):
        total = torch.addmm(precision, self.ones, window_precision)
        return torch.addmm(weighted, self.ones, window_weighted) / total, total


class PolicyGraph(nn.Module):
    """obs (1, O) [, latent (1, L)] -> deterministic action ``tanh(mean)`` (1, A).

    :class:`~metarl_ros.learning.networks.TanhGaussianActor`'s forward with the head cut to its
    mean rows: the log-std rows do not affect the deterministic action, and without the slice
    onnxruntime fuses the last Gemm with the tanh. Parity with the actor is checked at export.
    """

    def __init__(self, actor: TanhGaussianActor) -> None:
        super().__init__()
        # a structured actor (learning.model_actor) is exported whole: its forward is the graph
        self.structured = actor if type(actor) is not TanhGaussianActor else None
        self.obs_view = actor.obs_view
        self.trunk = actor.trunk
        head = actor.head
        self.head = nn.Linear(head.in_features, actor.act_dim)
        with torch.no_grad():
            self.head.weight.copy_(head.weight[: actor.act_dim])
            self.head.bias.copy_(head.bias[: actor.act_dim])

    def forward(self, obs: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        if self.structured is not None:
            return self.structured(obs if latent is None else torch.cat([obs, latent], dim=-1))
        if self.obs_view is not None:
            obs = obs @ self.obs_view.T
        x = obs if latent is None else torch.cat([obs, latent], dim=-1)
        return torch.tanh(self.head(F.relu(self.trunk(x))))


class EncoderTick(nn.Module):
    """``encoder.onnx``: new factor and the posterior (mean, std) over window + new factor."""

    def __init__(self, encoder: ContextEncoder, window_rows: int) -> None:
        super().__init__()
        self.factor = FactorGraph(encoder)
        self.product = WindowProduct(window_rows)

    def forward(self, transition, window_precision, window_weighted):
        precision, weighted = self.factor(transition)
        mean, total = self.product(precision, weighted, window_precision, window_weighted)
        return precision, weighted, mean, torch.rsqrt(total)


class PolicyStep(nn.Module):
    """``step.onnx``: :class:`EncoderTick` then the policy on the updated posterior mean."""

    def __init__(self, encoder: ContextEncoder, actor: TanhGaussianActor,
                 window_rows: int) -> None:
        super().__init__()
        self.factor = FactorGraph(encoder)
        self.product = WindowProduct(window_rows)
        self.policy = PolicyGraph(actor)

    def forward(self, transition, obs, window_precision, window_weighted):
        precision, weighted = self.factor(transition)
        mean, total = self.product(precision, weighted, window_precision, window_weighted)
        return precision, weighted, mean, total, self.policy(obs, mean)


def window_rows(window_size: int) -> int:
    """Rows of the held window: the previous ``K - 1`` factors (one all-zero row if K = 1)."""
    return max(1, window_size - 1)


def export_contract(loaded: LoadedModel) -> dict[str, str]:
    """The metadata_props of every exported graph (values are JSON strings)."""
    payload = loaded.payload
    setup = load_env_setup(model_env_config(payload, loaded.path))
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
    if setup.config.observation.model_features:
        contract["observation_layout"].append(
            "model features: " + ", ".join(FEATURE_NAMES) + " (control.model_features)")
    contract["effort"] = "kp * (q_ref - q) + kd * (qd_ref - qd) + action * action_scale"
    # "reference": the actor sees the observation's reference view only (a node may act
    # before the joint state arrives: act_ahead)
    contract["actor_view"] = loaded.agent.spec.actor_view
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
    from metarl_ros.policy.torch_policy import TorchAdaptivePolicy
    from metarl_ros.sim.env import ArmTrackingEnv
    from metarl_ros.sim.tasks import TaskParams

    setup = load_env_setup(model_env_config(loaded.payload, loaded.path))
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


class _Case:
    """One parity input: the newest transition, the window held before it, an observation.

    ``window_mu``/``window_var`` (K-1, L) with ``window_mask`` (K-1,) (1 = slot holds a factor).
    """

    def __init__(self, transition, obs, window_mu, window_var, window_mask) -> None:
        self.transition = np.asarray(transition, np.float32).reshape(1, -1)
        self.obs = np.asarray(obs, np.float32).reshape(1, -1)
        self.window_mu = np.asarray(window_mu, np.float32)
        self.window_var = np.asarray(window_var, np.float32)
        self.window_mask = np.asarray(window_mask, np.float32)

    def feeds(self) -> dict[str, np.ndarray]:
        """The window in the graphs' precision form (empty slots zero)."""
        precision = self.window_mask[:, None] / self.window_var
        return {"transition": self.transition,
                "window_precision": precision.astype(np.float32),
                "window_weighted": (precision * self.window_mu).astype(np.float32)}

    @torch.no_grad()
    def expected(self, loaded: LoadedModel) -> dict[str, np.ndarray]:
        """What the torch model gives: factor, posterior over window + factor, action."""
        agent = loaded.agent
        mu, var = agent.encoder.factors(torch.from_numpy(self.transition))
        mean, post_var = product_of_gaussians(
            torch.cat([torch.from_numpy(self.window_mu), mu]),
            torch.cat([torch.from_numpy(self.window_var), var]),
            torch.cat([torch.from_numpy(self.window_mask), torch.ones(1)]))
        action = agent.actor(torch.cat([torch.from_numpy(self.obs), mean[None]], dim=-1))
        return {"factor_mean": mu.numpy(), "factor_var": var.numpy(),
                "posterior_mean": mean[None].numpy(),
                "posterior_std": post_var.sqrt()[None].numpy(), "action": action.numpy()}


def _parity_cases(loaded: LoadedModel, samples: int, rng: np.random.Generator,
                  recorded: bool = True) -> list[_Case]:
    """Random windows (any fill, any mask) and (``recorded``) the real windows of a recorded
    episode, from the first transition (one factor) through full windows."""
    spec = loaded.agent.spec
    rows, latent = window_rows(loaded.contract.window_size), spec.latent_dim
    cases = [
        _Case(rng.normal(size=spec.transition_dim), rng.normal(size=spec.obs_dim),
              rng.normal(size=(rows, latent)), rng.uniform(0.01, 2.0, size=(rows, latent)),
              rng.random(rows) < rng.random())
        for _ in range(samples)
    ]
    if not recorded:
        return cases
    records = _recorded_inputs(loaded)
    transitions = np.stack([np.concatenate([r["obs"], r["action"], [r["reward"]], r["next_obs"]])
                            for r in records]).astype(np.float32)
    if loaded.agent.encoder is None:  # context-free model: only the observations matter
        empty = np.zeros((rows, latent)), np.ones((rows, latent)), np.zeros(rows)
        return cases + [_Case(t, r["next_obs"], *empty) for t, r in zip(transitions, records)]
    with torch.no_grad():
        mu, var = (t.numpy() for t in loaded.agent.encoder.factors(torch.from_numpy(transitions)))
    held = loaded.contract.window_size - 1
    for i, record in enumerate(records):
        first = max(0, i - held)
        w_mu, w_var, w_mask = np.zeros((rows, latent)), np.ones((rows, latent)), np.zeros(rows)
        count = i - first
        if count:
            w_mu[:count], w_var[:count], w_mask[:count] = mu[first:i], var[first:i], 1.0
        cases.append(_Case(transitions[i], record["next_obs"], w_mu, w_var, w_mask))
    return cases


def check_parity(
    loaded: LoadedModel, out_dir: Path, samples: int = 20, seed: int = 0, recorded: bool = True
) -> tuple[float, float]:
    """Differences between torch and onnxruntime over random and (``recorded``: from a
    simulated episode, which needs PyBullet) recorded inputs, for every graph in ``out_dir``
    (factors as mean and variance, posteriors as mean and std).

    Returns ``(max |onnx - torch|, max |onnx - torch| / (1 + |torch|))``; the second is what
    :data:`PARITY_TOLERANCE` bounds."""
    spec = loaded.agent.spec
    rng = np.random.default_rng(seed)
    cases = _parity_cases(loaded, samples, rng, recorded)
    worst = worst_scaled = 0.0

    def compare(expected: np.ndarray, got: np.ndarray) -> None:
        nonlocal worst, worst_scaled
        difference = np.abs(expected - got)
        worst = max(worst, float(difference.max()))
        worst_scaled = max(worst_scaled, float((difference / (1.0 + np.abs(expected))).max()))

    policy = _session(out_dir / "policy.onnx")
    for case in cases:
        if spec.conditioning != "latent":
            with torch.no_grad():
                expected = loaded.agent.actor(torch.from_numpy(case.obs)).numpy()
            compare(expected, policy.run(None, {"obs": case.obs})[0])
            continue
        latent = rng.normal(size=(1, spec.latent_dim)).astype(np.float32)
        with torch.no_grad():
            expected = loaded.agent.actor(torch.from_numpy(np.concatenate([case.obs, latent], 1)))
        compare(expected.numpy(), policy.run(None, {"obs": case.obs, "latent": latent})[0])
    if spec.conditioning != "latent":
        return worst, worst_scaled
    encoder, step = _session(out_dir / "encoder.onnx"), _session(out_dir / "step.onnx")
    for case in cases:
        expected = case.expected(loaded)
        feeds = case.feeds()
        for name, (precision, weighted, mean, spread, *action) in (
            ("encoder", encoder.run(None, feeds)),
            ("step", step.run(None, {**feeds, "obs": case.obs})),
        ):
            compare(expected["factor_var"], 1.0 / precision)
            compare(expected["factor_mean"], weighted / precision)
            compare(expected["posterior_mean"], mean)
            std = spread if name == "encoder" else 1.0 / np.sqrt(spread)
            compare(expected["posterior_std"], std)
            if action:
                compare(expected["action"], action[0])
    return worst, worst_scaled


def _export_graph(module: nn.Module, example: tuple, path: Path, inputs: list[str],
                  outputs: list[str], props: dict[str, str], doc: str) -> None:
    with torch.no_grad():
        torch.onnx.export(module.eval(), example, str(path), input_names=inputs,
                          output_names=outputs, opset_version=OPSET, dynamo=False)
    _add_metadata(path, props, doc)


def write_graphs(loaded: LoadedModel, out_dir: Path) -> None:
    """Write the graphs of ``loaded`` (module docstring) into the directory ``out_dir``, with
    the contract, unchecked (:func:`export_model` checks parity and publishes atomically)."""
    spec = loaded.agent.spec
    props = export_contract(loaded)
    latent_dim = spec.latent_dim if spec.conditioning == "latent" else 0
    obs, latent = torch.zeros(1, spec.obs_dim), torch.zeros(1, latent_dim)
    policy = PolicyGraph(loaded.agent.actor)
    if not latent_dim:
        _export_graph(policy, (obs,), out_dir / "policy.onnx", ["obs"], ["action"], props,
                      "metarl_ros policy: obs -> action in [-1, 1]")
        return
    _export_graph(policy, (obs, latent), out_dir / "policy.onnx", ["obs", "latent"],
                  ["action"], props, "metarl_ros policy: obs, latent -> action in [-1, 1]")
    rows = window_rows(loaded.contract.window_size)
    transition = torch.zeros(1, spec.transition_dim)
    window = (torch.zeros(rows, latent_dim), torch.zeros(rows, latent_dim))
    factor_outputs = ["factor_precision", "factor_weighted", "posterior_mean"]
    _export_graph(EncoderTick(loaded.agent.encoder, rows), (transition, *window),
                  out_dir / "encoder.onnx",
                  ["transition", "window_precision", "window_weighted"],
                  [*factor_outputs, "posterior_std"], props,
                  "metarl_ros PEARL encoder tick: new factor + product of Gaussians "
                  "(precision form)")
    _export_graph(PolicyStep(loaded.agent.encoder, loaded.agent.actor, rows),
                  (transition, obs, *window), out_dir / "step.onnx",
                  ["transition", "obs", "window_precision", "window_weighted"],
                  [*factor_outputs, "posterior_precision", "action"], props,
                  "metarl_ros control tick: encoder tick, then the policy on the "
                  "updated posterior mean")


def _is_previous_export(path: Path) -> bool:
    """A directory holding only what ``metarl export`` writes (safe to replace)."""
    names = {p.name for p in path.iterdir()}
    return "export.json" in names and names <= set(EXPORT_FILES) and all(
        (path / name).is_file() for name in names)


def export_model(model_path: str | Path, out_dir: str | Path) -> dict:
    """Export, check parity, then publish ``out_dir`` atomically. Returns a summary.

    ``out_dir`` must be new, empty, or a previous export (only :data:`EXPORT_FILES`), which is
    then replaced as a whole; anything else is refused and left untouched.
    """
    loaded = load_model(model_path)
    spec = loaded.agent.spec
    if spec.conditioning == "oracle":
        raise ExportError(f"{loaded.path}: the oracle needs the true task; it cannot be deployed")
    out_dir = Path(out_dir)
    replaces = out_dir.is_dir() and any(out_dir.iterdir())
    if replaces and not _is_previous_export(out_dir):
        raise ExportError(f"{out_dir}: exists and is not empty (nor a previous `metarl export` "
                          "output); choose a new --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory; choose a new --out")
    staging = make_staging_dir(out_dir.parent, prefix=f".{out_dir.name}.")  # umask honoured
    try:
        write_graphs(loaded, staging)
        worst, worst_scaled = check_parity(loaded, staging)
        if not worst_scaled <= PARITY_TOLERANCE:
            raise ExportError(
                f"{loaded.path}: ONNX outputs differ from torch by {worst_scaled:.2e} "
                f"(|onnx - torch| / (1 + |torch|) > {PARITY_TOLERANCE:.0e}; max absolute "
                f"difference {worst:.2e}); nothing written"
            )
        summary = {
            "model": str(loaded.path),
            "method": loaded.method,
            "opset": OPSET,
            "contract_version": CONTRACT_VERSION,
            "max_abs_diff": worst,
            "max_scaled_diff": worst_scaled,
            "files": sorted(p.name for p in staging.iterdir()),
        }
        (staging / "export.json").write_text(json.dumps(summary, indent=2))
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _publish(staging: Path, out_dir: Path) -> None:
    """Move ``staging`` to ``out_dir``; a previous export there is swapped out, then deleted
    (at every instant ``out_dir`` is either the old export, absent for a moment, or the new)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.replace(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    old.rmdir()
    os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
