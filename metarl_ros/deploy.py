"""Run an exported model with onnxruntime, without torch: the robot-side
:class:`~metarl_ros.runtime.AdaptivePolicy`.

This module must never import torch (a test checks it): robots' computers often lack it.
onnxruntime runs with one intra-op and one inter-op thread so inference does not compete with
the control loop. The encoder graph does one streaming-posterior tick (see
:mod:`metarl_ros.learning.export`); this class keeps the ring of the last ``K - 1`` factors.

MAML online adaptation needs gradients and stays in the torch node; the ONNX policy runs PEARL's
streaming posterior only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from metarl_ros.errors import MetarlError
from metarl_ros.runtime import PolicyContract, PosteriorSummary

REQUIRED_KEYS = (
    "joint_names",
    "control_rate_hz",
    "window_size",
    "latent_dim",
    "obs_dim",
    "act_dim",
    "action_scale",
    "effort_limits",
    "contract_version",
)
SUPPORTED_CONTRACT_VERSION = 1


class ModelContractError(MetarlError):
    """The exported model is missing, corrupt, or does not fit the robot it is given."""


def _open_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelContractError(f"{path}: not a loadable ONNX model ({exc})") from None


class _BoundGraph:
    """An inference session whose inputs and outputs live in fixed numpy buffers.

    The buffers are bound once (``OrtValue.ortvalue_from_numpy`` shares CPU memory), so a run
    is ``run_with_iobinding`` alone: no per-call conversion of feeds and no output
    allocation. That halves onnxruntime's Python-side cost per call here (~16 -> ~9 us for
    the 128-wide policy; docs/BENCHMARKS.md). Callers write inputs and read outputs in place.
    """

    def __init__(self, session, path: Path, buffers: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort

        self._session = session
        self._binding = session.io_binding()
        self._values = []  # keep the OrtValues (and so the shared buffers) alive
        for arg, bind in ([(a, self._binding.bind_ortvalue_input) for a in session.get_inputs()]
                          + [(a, self._binding.bind_ortvalue_output)
                             for a in session.get_outputs()]):
            buffer = buffers.get(arg.name)
            if buffer is None or list(buffer.shape) != list(arg.shape):
                raise ModelContractError(
                    f"{path}: {arg.name} has shape {arg.shape}, the contract implies "
                    f"{None if buffer is None else list(buffer.shape)}")
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            bind(arg.name, value)
            self._values.append(value)

    def run(self) -> None:
        self._session.run_with_iobinding(self._binding)


def read_contract(session, path: Path) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ModelContractError(
            f"{path}: no metarl_ros contract (missing {missing}); export it with `metarl export`"
        )
    try:
        contract = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as exc:
        raise ModelContractError(f"{path}: contract metadata is not valid JSON ({exc})") from None
    if contract["contract_version"] != SUPPORTED_CONTRACT_VERSION:
        raise ModelContractError(
            f"{path}: contract version {contract['contract_version']} is not "
            f"supported (expected {SUPPORTED_CONTRACT_VERSION})"
        )
    return contract


def find_model_dir(path: str | Path) -> Path:
    """The export directory for ``path``: itself, the folder of a ``policy.onnx`` given
    directly, or its ``onnx/`` sub-folder (the layout of ``metarl retrain`` and ``models/``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path.parent
    if path.is_dir() and not (path / "policy.onnx").exists() and (path / "onnx").is_dir():
        return path / "onnx"
    return path


def check_expected_contract(contract: PolicyContract, source: str | Path,
                            joint_names: list[str] | tuple[str, ...] | None = None,
                            rate_hz: float | None = None, window: int | None = None) -> None:
    """Raise :class:`ModelContractError` if ``contract`` differs from what a node is configured
    for (``None`` = not checked). Shared by the ONNX and the torch policies."""
    if joint_names is not None and list(joint_names) != list(contract.joint_names):
        raise ModelContractError(
            f"{source}: model joints {list(contract.joint_names)} do not match the configured "
            f"joints {list(joint_names)} (order matters; rename robot joints with joint_map)")
    if rate_hz is not None and abs(float(rate_hz) - contract.control_rate_hz) > 1e-6:
        raise ModelContractError(f"{source}: model control rate {contract.control_rate_hz:g} Hz, "
                                 f"configured {float(rate_hz):g} Hz")
    if window is not None and int(window) != contract.window_size:
        raise ModelContractError(f"{source}: model context window {contract.window_size}, "
                                 f"configured {int(window)}")


class OnnxAdaptivePolicy:
    """PEARL's policy and streaming posterior from ``policy.onnx`` (+ ``encoder.onnx``).

    Args:
        model_dir: a ``metarl export`` output directory.
        expected_joint_names, expected_rate_hz, expected_window: what the node is configured
            for; any mismatch with the model's contract refuses to start.
    """

    def __init__(
        self,
        model_dir: str | Path,
        expected_joint_names: list[str] | None = None,
        expected_rate_hz: float | None = None,
        expected_window: int | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        policy_path = model_dir / "policy.onnx"
        if not policy_path.is_file():
            raise ModelContractError(f"{policy_path}: model file not found")
        self._policy = _open_session(policy_path)
        c = read_contract(self._policy, policy_path)
        self.raw_contract = c
        self.contract = PolicyContract.from_dict(c)
        self._check_expectations(
            policy_path, expected_joint_names, expected_rate_hz, expected_window
        )
        self._encoder = None
        latent = self.contract.latent_dim
        if latent:
            encoder_path = model_dir / "encoder.onnx"
            if not encoder_path.is_file():
                raise ModelContractError(f"{encoder_path}: missing (the policy needs a latent)")
            self._encoder = _open_session(encoder_path)
            if read_contract(self._encoder, encoder_path).get("config_hash") != c.get(
                "config_hash"
            ):
                raise ModelContractError(
                    f"{encoder_path}: comes from another model than "
                    f"{policy_path} (config hash differs)"
                )
        k = max(1, self.contract.window_size - 1)
        obs_dim, act_dim = self.contract.obs_dim, self.contract.act_dim
        self._window_mean = np.zeros((k, latent), np.float32)
        self._window_var = np.ones((k, latent), np.float32)
        self._window_mask = np.zeros((k,), np.float32)
        self._mean = np.zeros((1, latent), np.float32)  # encoder output = policy input
        self._std = np.ones((1, latent), np.float32)
        self._obs = np.zeros((1, obs_dim), np.float32)
        self._action = np.zeros((1, act_dim), np.float32)
        self._transition = np.zeros((1, 2 * obs_dim + act_dim + 1), np.float32)
        self._factor_mean = np.zeros((1, latent), np.float32)
        self._factor_var = np.ones((1, latent), np.float32)
        policy_buffers = {"obs": self._obs, "action": self._action}
        if latent:
            policy_buffers["latent"] = self._mean
        self._policy_graph = _BoundGraph(self._policy, policy_path, policy_buffers)
        self._encoder_graph = None
        if self._encoder is not None:
            self._encoder_graph = _BoundGraph(self._encoder, model_dir / "encoder.onnx", {
                "transition": self._transition, "window_mean": self._window_mean,
                "window_var": self._window_var, "window_mask": self._window_mask,
                "factor_mean": self._factor_mean, "factor_var": self._factor_var,
                "posterior_mean": self._mean, "posterior_std": self._std})
        # slices of the transition buffer: (s, a, r, s')
        self._slices = (slice(0, obs_dim), slice(obs_dim, obs_dim + act_dim),
                        obs_dim + act_dim, slice(obs_dim + act_dim + 1, None))
        self._fill = 0
        self.inference_time_s = 0.0
        self.encoder_time_s = 0.0

    def _check_expectations(self, path, joints, rate, window) -> None:
        check_expected_contract(self.contract, path, joints, rate, window)

    # ----------------------------------------------------------------- AdaptivePolicy

    def reset(self) -> None:
        self._window_mask[:] = 0.0
        self._mean[:] = 0.0
        self._std[:] = 1.0
        self._fill = 0

    def observe(self, obs, action, reward, next_obs) -> None:
        if self._encoder is None:
            return
        start = time.perf_counter()
        assert self._encoder_graph is not None
        row = self._transition[0]
        s, a, r, s_next = self._slices
        row[s], row[a], row[r], row[s_next] = obs, action, reward, next_obs  # checks shapes
        self._encoder_graph.run()  # -> factor_mean/var, posterior mean/std (self._mean/_std)
        # shift the ring: oldest out, newest in (K-1 slots, oldest first)
        self._window_mean[:-1] = self._window_mean[1:]
        self._window_var[:-1] = self._window_var[1:]
        self._window_mask[:-1] = self._window_mask[1:]
        self._window_mean[-1] = self._factor_mean[0]
        self._window_var[-1] = self._factor_var[0]
        self._window_mask[-1] = 1.0
        self._fill = min(self._fill + 1, self.contract.window_size)
        self.encoder_time_s = time.perf_counter() - start

    def act(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        self._obs[0] = obs  # the latent input is bound to the posterior mean buffer
        self._policy_graph.run()
        action = self._action[0].copy()
        self.inference_time_s = time.perf_counter() - start
        return action

    def posterior(self) -> PosteriorSummary:
        return PosteriorSummary(self._mean[0].copy(), self._std[0].copy(), self._fill)
