"""Shared by the bag tests: a tiny env and model, the recorded fault, bag rewriting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from metarl_ros.core.resources import share_directory
from metarl_ros.learning.config import AgentConfig, DynamicsConfig, TrainConfig
from metarl_ros.learning.trainer import Trainer
from metarl_ros.recording.bag import BagWriter, jazzy_typestore
from metarl_ros.sim.tasks import FaultEvent, TaskParams

SHARE = share_directory()
JOINTS = ["lbr_iiwa_joint_1", "lbr_iiwa_joint_2", "lbr_iiwa_joint_3", "lbr_iiwa_joint_4",
          "lbr_iiwa_joint_5", "lbr_iiwa_joint_6", "lbr_iiwa_joint_7"]
#: the recorded mid-run fault: a 1.5 kg payload and worn gearboxes (Coulomb friction, N*m)
FAULT_TIME_S = 1.0
FAULT_CHANGE = {"payload_mass": 1.5, "coulomb_friction": [3.0, 3.0, 2.0, 2.0, 1.0, 0.5, 0.2]}
FAULT_LABEL = "payload 1.5 kg + worn gears"
RUN_S = 2.0


def fault_event() -> FaultEvent:
    task = TaskParams(payload_mass=FAULT_CHANGE["payload_mass"],
                      coulomb_friction=tuple(FAULT_CHANGE["coulomb_friction"])).normalized(7)
    return FaultEvent(FAULT_TIME_S, task, FAULT_LABEL)


def write_tiny_env(
    folder: Path, train_tasks: int = 4, fault_time_s: tuple[float, float] | None = None
) -> Path:
    """The shipped iiwa7 env with 1 s episodes and small task splits, written to ``folder``;
    ``fault_time_s`` optionally replaces the evaluation fault-time window."""
    tasks = yaml.safe_load((SHARE / "sim/tasks/iiwa7_faults.yaml").read_text())
    tasks["splits"]["train"]["num_tasks"] = train_tasks
    tasks["splits"]["heldout"]["num_tasks"] = 3
    tasks["splits"]["ood"]["num_tasks"] = 2
    if fault_time_s is not None:
        tasks["fault_time_s"] = {"low": fault_time_s[0], "high": fault_time_s[1]}
    (folder / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    env = yaml.safe_load((SHARE / "sim/envs/iiwa7_compliant.yaml").read_text())
    env["robot"] = str(SHARE / "sim/robots/iiwa7.yaml")
    env["tasks"] = str(folder / "tasks.yaml")
    env["episode_s"] = 1.0
    (folder / "env.yaml").write_text(yaml.safe_dump(env))
    return folder / "env.yaml"


def write_scenario(folder: Path) -> Path:
    """sim_node scenario: intact arm, the fault at FAULT_TIME_S."""
    scenario = {"name": "bag_test", "reference_seed": 5, "events": [
        {"time_s": FAULT_TIME_S, "label": FAULT_LABEL, "change": FAULT_CHANGE}]}
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def tiny_model(env: Path, run_dir: Path) -> Path:
    """An untrained tiny PEARL model file (what ``Trainer`` writes before any iteration),
    with a full-view MLP actor (``actor_head: mlp``; a model-structured actor starts as the
    zero residual too): its random feedback is worse than the env's own controller, so
    retraining on that controller's recorded data has something to improve (a feed-forward
    actor starts as the zero residual, which *is* that controller)."""
    config = TrainConfig(
        method="pearl", env=str(env), seed=3, envs_per_iteration=2, eval_tasks=2,
        replay_capacity_per_task=1000, torch_threads=1, context_window=8, parameter_weight=0.0,
        agent=AgentConfig(actor_hidden=[32, 32], critic_hidden=[32, 32], encoder_hidden=[32],
                          latent_dim=4, actor_view="full", actor_head="mlp"),
        dynamics=DynamicsConfig(hidden_sizes=[16], support_size=10, query_size=10,
                                tasks_per_meta_step=2))
    trainer = Trainer(config, run_dir, progress=False)
    path = trainer.write_final_model()
    trainer.rollout.close()
    trainer.eval_rollout.close()
    return path


Transform = Callable[[str, str, int, bytes], tuple[str, str, int, bytes] | None]


def rewrite_bag(source: Path, target: Path, transform: Transform,
                storage: str = "mcap", typestore=None) -> None:
    """Copy a bag message by message through ``transform(topic, type, log_ns, raw)``.

    ``transform`` returns the (possibly changed) message or None to drop it; a topic whose
    messages are all dropped is not registered.
    """
    from rosbags.highlevel import AnyReader

    with AnyReader([source], default_typestore=jazzy_typestore()) as reader:
        items = []
        for connection, log_ns, raw in reader.messages():
            result = transform(connection.topic, connection.msgtype, log_ns, bytes(raw))
            if result is not None:
                items.append(result)
    with BagWriter(target, storage=storage, typestore=typestore) as writer:
        for topic, msgtype, log_ns, raw in items:
            if not writer.has_topic(topic):
                writer.add_topic(topic, msgtype)
            writer.write(topic, log_ns, raw)
