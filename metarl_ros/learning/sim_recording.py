"""Record a simulated run straight to a bag, without ROS: sim core + control loop + bag writer.

What ``sim_node`` + ``adapter_node`` + ``recorder_node`` produce in lockstep, in one process
and much faster: the PyBullet arm (:class:`~metarl_ros.sim.arm_sim.ArmSimulation`, stepped
like sim_node's lockstep mode), the adapter's own control loop
(:class:`~metarl_ros.control.controller.AdaptiveController`) around any
:class:`~metarl_ros.control.policy_interface.AdaptivePolicy`, and the recorder's writer
(:class:`~metarl_ros.recording.bag.BagWriter`) fed CDR bytes. Topics, types, stamps and the
true-task JSON are sim_node's and adapter_node's; log times are a synthetic receive clock that
keeps the nodes' causal order (task event, reference, joint state, then the command answering it).

Used by the tests and ``benchmarks/bag_throughput.py``, and handy to produce offline data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl_ros.control.controller import AdaptiveController
from metarl_ros.control.loop_types import LoopConfig
from metarl_ros.control.policy_interface import AdaptivePolicy
from metarl_ros.recording.bag import FLOAT64_ARRAY, JOINT_STATE, STRING, BagWriter, make_qos
from metarl_ros.sim.arm_sim import ArmSimulation
from metarl_ros.sim.env_config import EnvSetup
from metarl_ros.sim.reference import MultiSineReference
from metarl_ros.sim.scenario import task_to_json
from metarl_ros.sim.tasks import FaultEvent, TaskParams

#: receive-clock origin of synthetic recordings (ns since the epoch; any value works)
LOG_ORIGIN_NS = 1_700_000_000_000_000_000


@dataclass
class SimRecording:
    """What was written: per-topic message counts and the run's length."""

    path: Path
    counts: dict[str, int]
    duration_s: float
    control_instants: int


class CdrMessages:
    """CDR bytes of the message types sim_node and adapter_node publish (rosbags typestore)."""

    def __init__(self, store) -> None:
        self._store = store
        self._JointState = store.types[JOINT_STATE]
        self._Header = store.types["std_msgs/msg/Header"]
        self._Time = store.types["builtin_interfaces/msg/Time"]
        self._Array = store.types[FLOAT64_ARRAY]
        self._Layout = store.types["std_msgs/msg/MultiArrayLayout"]
        self._String = store.types[STRING]

    def joint_state(self, stamp_ns: int, names: Sequence[str], position, velocity,
                    effort) -> bytes:
        header = self._Header(stamp=self._Time(sec=stamp_ns // 1_000_000_000,
                                               nanosec=stamp_ns % 1_000_000_000), frame_id="")
        msg = self._JointState(header=header, name=list(names),
                               position=np.asarray(position, np.float64),
                               velocity=np.asarray(velocity, np.float64),
                               effort=np.asarray(effort, np.float64))
        return bytes(self._store.serialize_cdr(msg, JOINT_STATE))

    def array(self, values) -> bytes:
        msg = self._Array(layout=self._Layout(dim=[], data_offset=0),
                          data=np.asarray(values, np.float64))
        return bytes(self._store.serialize_cdr(msg, FLOAT64_ARRAY))

    def string(self, text: str) -> bytes:
        return bytes(self._store.serialize_cdr(self._String(data=text), STRING))


def record_simulated_run(
    path: str | Path,
    setup: EnvSetup,
    policy: AdaptivePolicy,
    duration_s: float,
    *,
    initial_task: TaskParams | None = None,
    faults: Sequence[FaultEvent] = (),
    seed: int = 0,
    joint_state_rate_hz: float | None = None,
    controller: str = "effort_controller",
    storage: str = "mcap",
    version: int | None = None,
    latent_every: int = 10,
) -> SimRecording:
    """Run ``policy`` on the simulated arm for ``duration_s`` and record it to ``path``.

    Args:
        path: new bag directory.
        setup: env (robot, rates, reference, PD feedback).
        policy: the controller (e.g. ``make_policy("pd", setup)``).
        initial_task, faults: the task at t = 0 and scheduled changes (sim time).
        seed: reference trajectory and sensor noise, as sim_node's ``seed``.
        joint_state_rate_hz: rate of ``/joint_states``, ``/reference`` (default: control rate).
        latent_every: publish the policy's posterior every this many control instants.
    """
    robot = setup.robot
    names = list(robot.joint_names)
    n = robot.num_joints
    sim_rate = setup.config.sim_rate_hz
    control_rate = setup.config.control_rate_hz
    js_rate = joint_state_rate_hz or control_rate
    chunk = int(round(sim_rate / js_rate))
    sim = ArmSimulation(robot, sim_rate_hz=sim_rate,
                        gravity_compensation=setup.config.gravity_compensation, seed=seed,
                        robot_file=setup.robot_path)
    reference = MultiSineReference.sample(
        setup.config.reference, np.asarray(robot.default_pose), np.asarray(robot.position_lower),
        np.asarray(robot.position_upper), np.random.default_rng(seed))
    q_ref, qd_ref, _ = reference.evaluate(0.0)
    task = (initial_task or TaskParams()).normalized(n)
    sim.reset(q_ref, qd_ref, task=task)
    sim.schedule(sorted(faults))
    loop = AdaptiveController(setup.law, policy, LoopConfig(control_rate_hz=control_rate))
    policy.reset()
    command_topic = f"/{controller}/commands"
    writer = BagWriter(path, storage=storage, version=version)
    reliable = make_qos(True, False)
    try:
        for topic, msgtype, qos in (
                ("/sim/true_task", STRING, make_qos(True, True, 1)),
                ("/reference", JOINT_STATE, reliable), ("/joint_states", JOINT_STATE, reliable),
                (command_topic, FLOAT64_ARRAY, reliable),
                ("/adapter_node/latent", FLOAT64_ARRAY, reliable)):
            writer.add_topic(topic, msgtype, qos)
        messages = CdrMessages(writer.typestore)
        log = LOG_ORIGIN_NS

        def write(topic: str, data: bytes, gap_ns: int = 50_000) -> None:
            nonlocal log
            log += gap_ns
            writer.write(topic, log, data)

        write("/sim/true_task", messages.string(task_to_json(sim.task, 0.0, "initial")))
        command = np.zeros(n)
        steps = int(round(duration_s * js_rate))
        instants = 0
        for k in range(steps + 1):
            t = sim.time_s
            stamp = int(round(t * 1e9))
            q_ref, qd_ref, qdd_ref = reference.evaluate(t)
            write("/reference", messages.joint_state(stamp, names, q_ref, qd_ref, qdd_ref))
            reading = sim.measure()
            write("/joint_states", messages.joint_state(stamp, names, reading.position,
                                                        reading.velocity, reading.effort))
            # the adapter sees every message and decimates to its control rate itself
            due = loop.on_reference(t, t, names, q_ref, qd_ref, qdd_ref)
            due = loop.on_joint_state(t, t, names, reading.position, reading.velocity) or due
            if due:
                command = loop.tick(t).efforts
                write(command_topic, messages.array(command), gap_ns=200_000)
                instants += 1
                if latent_every and instants % latent_every == 0:
                    update = loop.update_context(t)
                    if update is not None:
                        write("/adapter_node/latent",
                              messages.array(np.concatenate([update.mean, update.std])))
            if k == steps:
                break
            for event in sim.step(command, substeps=chunk):
                write("/sim/true_task", messages.string(
                    task_to_json(event.task, event.time_s, event.label)))
            log += int(1e9 / js_rate) // 4  # the simulator's own time between publications
        return SimRecording(Path(path), dict(writer.counts), steps / js_rate, instants)
    finally:
        writer.close()
        sim.close()
