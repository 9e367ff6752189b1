"""``metarl retrain``: fine-tune a trained model offline from rosbag2 recordings.

    metarl retrain --bag runs/bag_a runs/bag_b --model models/pearl/model.pt --out models/pearl_v2

1. **Read** the bags into (s, a, r, s') transitions (:mod:`metarl_ros.learning.bag_dataset`):
   state, command and reference aligned on the control grid, actions recovered from the
   commands, observation and reward rebuilt with the env's own functions.
2. **Split into tasks** by recorded fault events, else by change points of the encoder's
   posterior.
3. **Fine-tune** encoder, critic and policy offline, starting from the input model.
4. **Evaluate** the input and the new model in simulation on the tasks the bags came from
   (when the bags recorded true task events, i.e. came from simulation): each bag becomes an
   episode with its initial task and its faults at their recorded times, run with the same
   seeds for both models.
5. **Write** ``--out``: ``model.pt`` (same format, contract, dynamics models and training
   config as the input, metadata says where it came from), ``onnx/`` (``metarl export``'s
   output), ``eval.json`` (before/after) and ``retrain.json`` (what was read and dropped, the
   tasks, training statistics), both strict JSON (a value that is not a number, e.g. a loss
   not computed during the critic warm-up, is ``null``). Everything is built in a temporary
   sibling directory ``.<out>.<pid>-<random>.tmp`` and renamed into place at the end, so
   ``--out`` either does not exist or is complete; it must not exist or be empty beforehand,
   and the input model is never touched. Such folders left by a killed run are removed by the
   next run writing next to them.

**Offline objective**: TD3+BC on the SAC networks, see
:mod:`~metarl_ros.learning.offline_trainer`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveFloat

from metarl_ros import __version__
from metarl_ros.core.files import make_staging_dir, remove_stale_staging_dirs
from metarl_ros.core.schema import StrictModel, load_yaml_model
from metarl_ros.learning.agent import ConditionedSAC
from metarl_ros.learning.bag_dataset import AlignmentConfig, read_bag
from metarl_ros.learning.bag_streams import BagTopics
from metarl_ros.learning.bag_tasks import BagTransitions, SegmentationConfig, TaskData, build_tasks
from metarl_ros.learning.checkpoint import atomic_torch_save, build_model_payload, model_env_config
from metarl_ros.learning.offline_trainer import (
    OBJECTIVE,
    OfflineTrainer,
    OfflineTrainingConfig,
    RetrainError,
)
from metarl_ros.learning.rollout import VectorRollout
from metarl_ros.learning.saved_model import LoadedModel, load_model
from metarl_ros.sim.env_config import EnvSetup, load_env_setup
from metarl_ros.sim.tasks import FaultEvent, TaskParams


class RetrainEvaluationConfig(StrictModel):
    """Before/after evaluation in simulation (bags with true task events only)."""

    enabled: bool = True
    seeds: list[NonNegativeInt] = Field(default=[0, 1, 2], min_length=1,
                                        description="episode seeds, the same for both models")
    max_episode_s: PositiveFloat = Field(default=20.0,
                                         description="longer bags are evaluated on their start")


class RetrainConfig(StrictModel):
    """``--config`` of ``metarl retrain`` (all sections optional; see config/retrain.yaml)."""

    topics: BagTopics = BagTopics()
    alignment: AlignmentConfig = AlignmentConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    training: OfflineTrainingConfig = OfflineTrainingConfig()
    evaluation: RetrainEvaluationConfig = RetrainEvaluationConfig()


def load_retrain_config(path: str | Path | None) -> RetrainConfig:
    return RetrainConfig() if path is None else load_yaml_model(RetrainConfig, path)


# ------------------------------------------------------------------------------------------
# Evaluation in simulation


@dataclass
class EvalEpisode:
    """One bag as a simulated episode: its initial task, faults (episode time) and length."""

    source: str
    initial: TaskParams
    initial_label: str
    faults: list[FaultEvent]
    steps: int


def episodes_from_bags(bags: Sequence[BagTransitions], setup: EnvSetup,
                       max_episode_s: float) -> list[EvalEpisode]:
    """Episodes for the bags that recorded true task events (others cannot be simulated)."""
    episodes = []
    for bag in bags:
        if not bag.events:
            continue
        start = bag.start_s
        before = [e for e in bag.events if e.time_s <= start + 1e-9]
        initial = before[-1] if before else bag.events[0]
        later = [e for e in bag.events if e.time_s > start + 1e-9 and e is not initial]
        length = min(bag.duration_s, max_episode_s)
        steps = int(round(length / setup.control_dt))
        faults = [FaultEvent(e.time_s - start, e.task, e.label or "fault") for e in later
                  if e.time_s - start < length]
        if steps > 0:
            episodes.append(EvalEpisode(str(bag.path), initial.task, initial.label, faults,
                                        steps))
    return episodes


def evaluate_agent(agent: ConditionedSAC, setup: EnvSetup, episodes: Sequence[EvalEpisode],
                   seeds: Sequence[int], window: int) -> dict:
    """Deterministic episodes (posterior mean), one per (episode, seed); returns metrics."""
    rows = []
    rollout = VectorRollout(setup, len(seeds))
    try:
        for episode in episodes:
            result = rollout.run(
                agent, [episode.initial] * len(seeds), list(seeds),
                faults=[episode.faults] * len(seeds), deterministic=True, latent_mode="mean",
                window=window, steps=episode.steps)
            fault = None
            if episode.faults:
                fault = int(round(episode.faults[0].time_s / setup.control_dt))
            for i, seed in enumerate(seeds):
                reward, error = result.reward[i], result.tracking_error[i]
                row = {"source": episode.source, "seed": int(seed),
                       "return": float(reward.sum()),
                       "tracking_error_mean": float(error.mean())}
                if fault is not None and 0 < fault < len(reward):
                    row.update({"post_fault_return": float(reward[fault:].sum()),
                                "tracking_error_before_fault": float(error[:fault].mean()),
                                "tracking_error_after_fault": float(error[fault:].mean())})
                rows.append(row)
    finally:
        rollout.close()
    summary: dict = {"episodes": rows}
    for key in ("return", "tracking_error_mean", "post_fault_return",
                "tracking_error_before_fault", "tracking_error_after_fault"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary[f"{key}_mean"] = float(np.mean(values))
    return summary


# ------------------------------------------------------------------------------------------
# The command


def _check_out(out: Path) -> None:
    """``--out`` must not exist or be an empty directory (so the input model is never in it)."""
    if out.exists():
        if not out.is_dir():
            raise RetrainError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()):
            raise RetrainError(f"--out {out}: exists and is not empty; choose a new directory "
                               "(the input model is never overwritten)")


def summary_lines(bags: Sequence[BagTransitions], tasks: Sequence[TaskData],
                  how: dict[str, str]) -> list[str]:
    """Human-readable account of what was read, kept and dropped."""
    lines = []
    for bag in bags:
        in_bag = sum(count for _, count in bag.topics.values())
        lines.append(f"{bag.path}: {bag.duration_s:.2f} s; {bag.read_messages} of {in_bag} "
                     f"messages read (the rest are on topics retraining does not use); "
                     f"{bag.control_instants} control instants, {len(bag)} transitions; "
                     f"tasks: {how.get(str(bag.path), '-')}")
        for topic, (msgtype, count) in sorted(bag.topics.items()):
            lines.append(f"    {topic:<32} {msgtype:<40} {count:>8} messages")
        if not bag.dropped:
            lines.append("    dropped: nothing")
        for reason, count in sorted(bag.dropped.items()):
            lines.append(f"    dropped {count:>6}: {reason}")
        if bag.events:
            lines.append("    task events: " + ", ".join(
                f"{e.label or 'event'} @ {e.time_s:.3f} s" for e in bag.events))
    lines.append(f"{len(tasks)} task(s): " + "; ".join(
        f"{t.name} ({len(t)} transitions)" for t in tasks))
    return lines


Exporter = Callable[[Path, Path], None]
"""``export(model_pt, onnx_dir)``: writes the deployable ONNX files of a model file."""


def retrain(bag_paths: Sequence[str | Path], model_path: str | Path, out: str | Path,
            config: RetrainConfig = RetrainConfig(), progress: bool = True,
            log=print, export: Exporter | None = None) -> dict:
    """Everything ``metarl retrain`` does; returns the report written to ``retrain.json``.

    ``export`` (``metarl retrain`` passes :func:`metarl_ros.policy.onnx_export.export_model`)
    also writes ``onnx/`` beside ``model.pt``.
    """
    out, model_path = Path(out), Path(model_path)
    _check_out(out)
    torch.set_num_threads(config.training.torch_threads)
    loaded: LoadedModel = load_model(model_path)
    spec = loaded.agent.spec
    if spec.conditioning == "oracle":
        raise RetrainError(f"{loaded.path}: an oracle model needs the true task online; "
                           "retrain a pearl, robust or nominal model")
    contract = loaded.contract
    setup = load_env_setup(model_env_config(loaded.payload, loaded.path))
    window = contract.window_size or 1

    bags = [read_bag(p, setup, contract.joint_names, config.topics, config.alignment,
                     contract.control_rate_hz, progress) for p in bag_paths]
    encoder = loaded.agent.encoder if spec.conditioning == "latent" else None
    tasks, how = build_tasks(bags, encoder, window, config.segmentation)
    tasks = [t for t in tasks if len(t)]
    for line in summary_lines(bags, tasks, how):
        log(line)
    if not tasks:
        raise RetrainError("no usable transitions in " + ", ".join(str(p) for p in bag_paths)
                           + " (see the dropped counts above)")

    episodes = (episodes_from_bags(bags, setup, config.evaluation.max_episode_s)
                if config.evaluation.enabled else [])
    seeds = list(config.evaluation.seeds)
    before = evaluate_agent(loaded.agent, setup, episodes, seeds, window) if episodes else None

    stats = OfflineTrainer(loaded.agent, tasks, config.training, window).run(progress)
    log(f"trained {stats['updates']} updates in {stats['seconds']:.1f} s ({OBJECTIVE}); "
        f"final critic loss {stats.get('final/critic_loss', float('nan')):.4f}, "
        f"BC mse {stats.get('final/bc_mse', float('nan')):.5f}")

    after = evaluate_agent(loaded.agent, setup, episodes, seeds, window) if episodes else None
    evaluation: dict = {"seeds": seeds, "episodes": [
        {"source": e.source, "initial_task": e.initial_label, "steps": e.steps,
         "faults": [{"time_s": f.time_s, "label": f.label} for f in e.faults]}
        for e in episodes]}
    if before is not None and after is not None:
        evaluation.update(before=before, after=after)
        for key in ("return_mean", "post_fault_return_mean"):
            if key in before and key in after:
                log(f"eval {key}: {before[key]:.2f} (input model) -> {after[key]:.2f} (retrained)")
    else:
        evaluation["skipped"] = "no bag recorded true task events (not from simulation)"
        log("eval skipped: no bag recorded true task events (not from simulation)")

    report = {
        "model": str(loaded.path), "bags": [str(p) for p in bag_paths],
        "objective": OBJECTIVE, "config": config.model_dump(mode="json"),
        "bags_read": [{
            "path": str(b.path), "duration_s": b.duration_s, "messages_read": b.read_messages,
            "topics": {t: {"type": ty, "messages": c} for t, (ty, c) in b.topics.items()},
            "control_instants": b.control_instants, "transitions": len(b),
            "dropped": dict(b.dropped), "task_split": how.get(str(b.path), ""),
            "events": [{"time_s": e.time_s, "label": e.label} for e in b.events],
        } for b in bags],
        "tasks": [{"name": t.name, "transitions": len(t), "sources": t.sources,
                   "task": t.task.to_dict() if t.task else None} for t in tasks],
        "training": stats,
    }
    metadata = dict(loaded.payload.get("metadata", {}))
    metadata.update({
        "retrained_from": str(loaded.path),
        "retrain": {"bags": [str(p) for p in bag_paths], "objective": OBJECTIVE,
                    "updates": stats["updates"],
                    "transitions": int(sum(len(t) for t in tasks)), "tasks": len(tasks)},
        "metarl_ros_version": __version__,
    })
    payload = build_model_payload(
        agent_state={k: v.detach().clone() for k, v in loaded.agent.state_dict().items()},
        agent_spec=spec, train_config=loaded.payload["train_config"],
        env_config_path=loaded.payload["env_config"], contract=loaded.payload["contract"],
        extra_states=loaded.payload.get("extra", {}), metadata=metadata)
    for stale in remove_stale_staging_dirs(out.parent, f".{out.name}.", ".tmp"):
        log(f"removed {stale}, left by a retrain that was killed")
    _write_outputs(out, payload, report, evaluation, export)
    log(f"wrote {out}: model.pt, {'onnx/, ' if export else ''}eval.json, retrain.json")
    return {**report, "evaluation": evaluation}


def strict_json(value):
    """``value`` with every float that JSON cannot hold (NaN, inf) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _write_outputs(out: Path, payload: dict, report: dict, evaluation: dict,
                   export: Exporter | None) -> None:
    """Build ``out`` in a temporary sibling, then rename it into place (see the module doc)."""
    staging = make_staging_dir(out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        atomic_torch_save(payload, staging / "model.pt")
        if export is not None:
            export(staging / "model.pt", staging / "onnx")
            export_json = staging / "onnx" / "export.json"
            exported = json.loads(export_json.read_text())
            exported["model"] = str(out / "model.pt")
            export_json.write_text(json.dumps(exported, indent=2))
        (staging / "eval.json").write_text(
            json.dumps(strict_json(evaluation), indent=2, allow_nan=False))
        report = json.loads(json.dumps(report, default=str))  # paths etc. as strings
        (staging / "retrain.json").write_text(
            json.dumps(strict_json(report), indent=2, allow_nan=False))
        if out.exists():
            out.rmdir()  # empty (checked before anything was read)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
