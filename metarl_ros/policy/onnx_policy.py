"""Run an exported model with onnxruntime, without torch: the robot-side
:class:`~metarl_ros.control.policy_interface.AdaptivePolicy`.

This module must never import torch (a test checks it): robots' computers often lack it.
onnxruntime runs with one intra-op and one inter-op thread so inference does not compete with
the control loop. Graph formats: :mod:`metarl_ros.policy.onnx_export`.

Per control tick (``observe`` then ``act``) one onnxruntime call runs: ``observe`` only stores
the transition; ``act`` runs ``step.onnx`` (the new transition's factor, the product over the
window, the policy on the updated posterior mean). ``act`` without a new transition runs
``policy.onnx``; ``posterior`` with one not yet acted on runs ``encoder.onnx``. The previous
``K - 1`` factors are held in a ring in precision form (empty slots zero), so the posterior is
always the exact product over the last ``K`` transitions, as in the torch runtime. With
``posterior_update='context'`` the encoder leaves the control path: ticks run ``policy.onnx``
only and the queued transitions are folded in at the context rate (``update_context``).

MAML online adaptation needs gradients and stays in the torch node; the ONNX policy runs PEARL's
streaming posterior only.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from metarl_ros.control.policy_interface import PolicyContract, PosteriorSummary
from metarl_ros.core.errors import MetarlError

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
SUPPORTED_CONTRACT_VERSION = 2


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
    allocation (docs/BENCHMARKS.md compares it with ``session.run``). Callers write inputs and
    read outputs in place.
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

        self.run: Callable[[], None]
        """Run the graph on the bound buffers."""
        try:  # the pybind call itself: the public wrapper adds ~1 us of Python checks (for
            # WebGPU graph capture) per call, a tenth of a whole control tick here
            self.run = functools.partial(session._sess.run_with_iobinding,
                                         self._binding._iobinding, None)
        except AttributeError:  # another onnxruntime layout: the public method
            self.run = functools.partial(session.run_with_iobinding, self._binding)


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
            f"supported (expected {SUPPORTED_CONTRACT_VERSION}); re-export the model with "
            "this version's `metarl export --model <model.pt> --out <dir>`"
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


POSTERIOR_UPDATES = ("tick", "context")


class OnnxAdaptivePolicy:
    """PEARL's policy and streaming posterior from a ``metarl export`` directory.

    Args:
        model_dir: a ``metarl export`` output directory (``policy.onnx``; ``encoder.onnx`` and
            ``step.onnx`` for a model with a latent).
        expected_joint_names, expected_rate_hz, expected_window: what the node is configured
            for; any mismatch with the model's contract refuses to start.
        posterior_update: ``tick`` (default): every ``act`` after an ``observe`` runs
            ``step.onnx`` -- the policy always sees the posterior including the newest
            transition, step for step as the torch runtime. ``context``: ``observe`` only
            queues the transition and ``act`` runs ``policy.onnx`` on the latent of the last
            update; :meth:`update_context` (the control loop calls it at its context rate) or
            :meth:`posterior` folds the queue in, one ``encoder.onnx`` call per transition.
            The posterior is the same exact product over the last K transitions once folded;
            the policy's latent lags by up to one context period. Cheaper per control tick.
    """

    def __init__(
        self,
        model_dir: str | Path,
        expected_joint_names: list[str] | None = None,
        expected_rate_hz: float | None = None,
        expected_window: int | None = None,
        posterior_update: str = "tick",
    ) -> None:
        if posterior_update not in POSTERIOR_UPDATES:
            raise ValueError(f"posterior_update {posterior_update!r}: expected one of "
                             f"{', '.join(POSTERIOR_UPDATES)}")
        model_dir = Path(model_dir)
        policy_path = model_dir / "policy.onnx"
        if not policy_path.is_file():
            raise ModelContractError(f"{policy_path}: model file not found")
        policy = _open_session(policy_path)
        c = read_contract(policy, policy_path)
        self.raw_contract = c
        self.contract = PolicyContract.from_dict(c)
        self.acts_on_reference = c.get("actor_view") == "reference"
        """the graphs act on the observation's reference view only (contract ``actor_view``;
        exports before it was recorded: False)"""
        check_expected_contract(self.contract, policy_path, expected_joint_names,
                                expected_rate_hz, expected_window)
        latent, obs_dim = self.contract.latent_dim, self.contract.obs_dim
        act_dim = self.contract.act_dim
        rows = max(1, self.contract.window_size - 1)
        width = 2 * obs_dim + act_dim + 1
        # buffers bound to the graphs' inputs and outputs (written and read in place)
        self._transition = np.zeros((1, width), np.float32)
        self._obs = np.zeros((1, obs_dim), np.float32)
        self._action = np.zeros((1, act_dim), np.float32)
        self._window = np.zeros((2, rows, latent), np.float32)  # [precision, weighted]
        self._factor = np.zeros((2, 1, latent), np.float32)  # the newest factor, same form
        self._mean = np.zeros((1, latent), np.float32)  # posterior mean = policy latent
        self._precision = np.ones((1, latent), np.float32)  # posterior precision (step)
        self._std = np.ones((1, latent), np.float32)  # posterior std (encoder)
        policy_buffers = {"obs": self._obs, "action": self._action}
        if latent:
            policy_buffers["latent"] = self._mean
        self._policy = _BoundGraph(policy, policy_path, policy_buffers)
        self._step = self._encoder = None
        if latent:
            window = {"transition": self._transition, "window_precision": self._window[0],
                      "window_weighted": self._window[1], "factor_precision": self._factor[0],
                      "factor_weighted": self._factor[1], "posterior_mean": self._mean}
            self._encoder = self._open_graph(model_dir / "encoder.onnx", c, {
                **window, "posterior_std": self._std})
            self._step = self._open_graph(model_dir / "step.onnx", c, {
                **window, "obs": self._obs, "posterior_precision": self._precision,
                "action": self._action})
        self.posterior_update = posterior_update
        self._every_tick = posterior_update == "tick"
        # transitions observed but not yet in the posterior: in the bound transition buffer
        # (tick: at most one), or in a queue of up to K rows (context)
        self._queue = np.zeros((0 if self._every_tick else self.contract.window_size, width),
                               np.float32)
        self._queued = 0
        # views made once (a view costs as much to make as the copy into it): the (s, a, s')
        # blocks of each row observe writes, each ring slot (both forms), the new factor, obs
        self._r = obs_dim + act_dim
        self._rows_in = [(row[:obs_dim], row[obs_dim:self._r], row, row[self._r + 1:])
                         for row in (self._transition if self._every_tick else self._queue)]
        self._slots = [self._window[:, i] for i in range(rows)]
        self._new_factor = self._factor[:, 0]
        self._obs_row, self._action_row = self._obs[0], self._action[0]
        self._rows = rows
        self._holds_window = self.contract.window_size > 1
        self._std_from: Literal["prior", "std", "precision"] = "prior"
        """where the posterior std comes from: N(0, I), encoder.onnx's std, step.onnx's
        precision"""
        self._next_slot = 0
        self._fill = 0
        self.inference_time_s = 0.0
        self.encoder_time_s = 0.0

    @staticmethod
    def _open_graph(path: Path, contract: dict[str, Any],
                    buffers: dict[str, np.ndarray]) -> _BoundGraph:
        if not path.is_file():
            raise ModelContractError(f"{path}: missing (the policy needs a latent)")
        session = _open_session(path)
        if read_contract(session, path).get("config_hash") != contract.get("config_hash"):
            raise ModelContractError(
                f"{path}: comes from another model than policy.onnx (config hash differs)")
        return _BoundGraph(session, path, buffers)

    def _commit(self) -> None:
        """The new factor (graph output) overwrites the oldest slot of the ring."""
        if self._holds_window:
            self._slots[self._next_slot][...] = self._new_factor
            self._next_slot = (self._next_slot + 1) % self._rows

    def _fold(self) -> None:
        """Fold the queued transitions into the posterior, oldest first (``encoder.onnx``)."""
        start = time.perf_counter()
        assert self._encoder is not None
        for i in range(self._queued):
            if not self._every_tick:
                self._transition[0] = self._queue[i]
            self._encoder.run()
            self._commit()
        self._queued = 0
        self._std_from = "std"
        self.encoder_time_s = time.perf_counter() - start

    # ----------------------------------------------------------------- AdaptivePolicy

    def reset(self) -> None:
        self._window[:] = 0.0
        self._mean[:] = 0.0
        self._std[:] = 1.0
        self._std_from = "prior"
        self._queued = 0
        self._next_slot = 0
        self._fill = 0

    def observe(self, obs, action, reward, next_obs) -> None:
        if self._step is None:
            return
        if self._queued == len(self._rows_in):  # tick: two observes without an act between
            self._fold()
        s, a, row, s_next = self._rows_in[self._queued]
        s[...] = obs  # a wrong length raises (numpy)
        a[...] = action
        row[self._r] = reward
        s_next[...] = next_obs
        self._queued += 1
        self._fill = min(self._fill + 1, self.contract.window_size)

    def act(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        self._obs_row[...] = obs
        if self._queued and self._every_tick:  # one call: factor, product, policy
            assert self._step is not None
            self._step.run()
            self._commit()
            self._queued = 0
            self._std_from = "precision"
        else:  # the latent input is bound to the posterior mean buffer
            self._policy.run()
        action = self._action_row.copy()
        self.inference_time_s = time.perf_counter() - start
        return action

    def latent_mean(self) -> np.ndarray:
        """The latent the last action was computed with (the posterior mean of the last
        update), (latent_dim,) float32; a copy. Cheap: no graph runs."""
        return self._mean[0].copy()

    def update_context(self) -> None:
        """Fold the transitions observed since the last update into the posterior (the
        control loop calls this at its context rate; with ``posterior_update='tick'`` there is
        at most one, left over when ``observe`` was not followed by ``act``)."""
        if self._queued:
            self._fold()

    def posterior(self) -> PosteriorSummary:
        self.update_context()
        if self._std_from == "precision":
            std = 1.0 / np.sqrt(self._precision[0])
        else:
            std = self._std[0].copy()
        return PosteriorSummary(self._mean[0].copy(), std.astype(np.float32), self._fill)
