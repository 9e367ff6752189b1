"""Rosbag recording and offline retraining throughput (issue #6).

    .venv/bin/python benchmarks/bag_throughput.py [--bag-seconds 60] [--record-seconds 60]
                                                  [--rate 500] [--skip-read] [--skip-record]
                                                  [--kill-trials N] [--storage mcap]

**Bag -> transitions.** A simulated run (PD controller through the adapter's control loop,
joint states and reference at 500 Hz, commands at 100 Hz, a payload fault halfway) is written
to MCAP through the recorder's writer (:func:`metarl_ros.learning.sim_recording.
record_simulated_run`). On that bag, in the same process and run, three readers go over the
topics ``metarl retrain`` uses (joint states, reference, commands, task events):

* bare read -- ``rosbags.highlevel.AnyReader.messages()`` yielding raw CDR, nothing else;
* bare read + rosbags deserialize -- the same plus ``reader.deserialize()`` per message;
* bag -> transitions -- :func:`metarl_ros.learning.bag_dataset.read_bag`: read, decode, map
  joints, align on the control grid, recover actions, build (s, a, r, s').

Each is repeated (``--repeats``) and the best time kept; throughput is messages per second.

**Recorder at 500 Hz.** ``recorder_node`` runs as its own process (the installed executable's
code, MCAP); this script publishes ``sensor_msgs/JointState`` on ``/joint_states`` at
``--rate`` Hz against the wall clock for ``--record-seconds``, each message carrying its
sequence number in the stamp; then the recorder gets SIGINT and the bag is read back. Dropped =
published - recorded (and which sequence numbers are missing); the recorder's CPU share comes
from ``/proc/<pid>/stat`` over the publishing window. ``--baseline`` measures a bare rclpy
subscriber (raw, counting only) the same way: the share of the CPU that is rclpy itself.

**Writer.** ``--write-messages N``: N JointStates (7 joints) through the recorder's
:class:`~metarl_ros.recording.bag.BagWriter` in this process, no ROS: messages and MB per
second of the writer alone (best of ``--repeats``), flushes included.

**SIGKILL (issue #20).** ``--kill-trials N``: N times, the recorder gets SIGKILL at a random
moment 1.5-4 s into the publishing; ``metarl bag repair`` rebuilds the bag and the data lost
is the time between the kill and the publication of the newest recovered message (and any
gap before it would count as a failure).

DDS stays on loopback on a domain of this run (ROS_* variables are set here and for the child).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loopback import loopback_ros_env  # benchmarks/loopback.py

REPO = Path(__file__).resolve().parent.parent
JOINTS = [f"lbr_iiwa_joint_{i}" for i in range(1, 8)]


# ---------------------------------------------------------------------------- bag -> transitions


def make_bag(folder: Path, seconds: float) -> Path:
    from metarl_ros.learning.sim_recording import record_simulated_run
    from metarl_ros.policy.factory import make_policy
    from metarl_ros.sim.env_config import load_env_setup
    from metarl_ros.sim.tasks import FaultEvent, TaskParams

    setup = load_env_setup()
    fault = FaultEvent(seconds / 2, TaskParams(payload_mass=2.0).normalized(7), "payload 2 kg")
    path = folder / "sim_run"
    start = time.perf_counter()
    record_simulated_run(path, setup, make_policy("pd", setup), seconds, faults=[fault],
                         seed=1, joint_state_rate_hz=500.0)
    print(f"wrote {path} ({seconds:g} s simulated) in {time.perf_counter() - start:.1f} s",
          flush=True)
    return path


def read_benchmark(bag: Path, repeats: int) -> dict:
    from rosbags.highlevel import AnyReader

    from metarl_ros.learning.bag_dataset import read_bag
    from metarl_ros.recording.bag import jazzy_typestore
    from metarl_ros.sim.env_config import load_env_setup

    setup = load_env_setup()
    used = {"/joint_states", "/reference", "/effort_controller/commands", "/sim/true_task"}

    def bare(deserialize: bool) -> int:
        count = 0
        with AnyReader([bag], default_typestore=jazzy_typestore()) as reader:
            connections = [c for c in reader.connections if c.topic in used]
            for connection, _, raw in reader.messages(connections=connections):
                if deserialize:
                    reader.deserialize(raw, connection.msgtype)
                count += 1
        return count

    results: dict = {}
    transitions = 0
    for name, run in (("bare read", lambda: bare(False)),
                      ("bare read + rosbags deserialize", lambda: bare(True)),
                      ("bag -> transitions (read_bag)", None)):
        best = float("inf")
        count = 0
        for _ in range(repeats):
            start = time.perf_counter()
            if run is None:
                data = read_bag(bag, setup, JOINTS)
                count, transitions = data.read_messages, len(data)
            else:
                count = run()
            best = min(best, time.perf_counter() - start)
        results[name] = {"messages": count, "seconds": best, "messages_per_s": count / best}
        print(f"{name:34s} {count:8d} messages in {best:.3f} s = {count / best:10.0f} msg/s",
              flush=True)
    results["bag -> transitions (read_bag)"]["transitions"] = transitions
    bare_rate = results["bare read"]["messages_per_s"]
    ratio = results["bag -> transitions (read_bag)"]["messages_per_s"] / bare_rate
    results["ratio_to_bare_read"] = ratio
    print(f"bag -> transitions at {100 * ratio:.0f} % of the bare read "
          f"({transitions} transitions)", flush=True)
    return results


# ---------------------------------------------------------------------------- recorder at 500 Hz


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_subscriber() -> int:
    """Baseline process: a raw rclpy subscription on /joint_states that only counts."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState

    rclpy.init()
    node = Node("bare_subscriber")
    count = [0]

    def on_message(_data) -> None:
        count[0] += 1

    node.create_subscription(JointState, "/joint_states", on_message,
                             QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE),
                             raw=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        print(f"received {count[0]} messages", flush=True)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def record_benchmark(folder: Path, seconds: float, rate: float, bare: bool = False) -> dict:
    """Publish to recorder_node (or, ``bare``, to a counting subscriber) and count drops."""
    env = loopback_ros_env()
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                           "ROS_LOCALHOST_ONLY")})
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState

    bag = folder / "recorded"
    command = ([sys.executable, __file__, "--bare-subscriber"] if bare else
               [sys.executable, "-m", "metarl_ros.nodes.recorder_node", "--ros-args",
                "-p", f"output:={bag}", "-p", "topics:=['/joint_states']",
                "-p", "types:=['sensor_msgs/msg/JointState']"])
    recorder = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    rclpy.init()
    node = Node("bag_benchmark_publisher")
    qos = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.VOLATILE)
    publisher = node.create_publisher(JointState, "/joint_states", qos)
    try:
        deadline = time.monotonic() + 30.0
        while publisher.get_subscription_count() == 0:
            if time.monotonic() > deadline or recorder.poll() is not None:
                raise RuntimeError("recorder_node did not subscribe")
            time.sleep(0.05)
        time.sleep(0.5)
        period = 1.0 / rate
        total = int(round(seconds * rate))
        msg = JointState(name=JOINTS, position=[0.1] * 7, velocity=[0.0] * 7, effort=[0.0] * 7)
        cpu_start, wall_start = _cpu_seconds(recorder.pid), time.monotonic()
        late = 0
        for i in range(total):
            target = wall_start + i * period
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -period:
                late += 1
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(i, 1_000_000_000)
            msg.position[0] = i * 1e-6
            publisher.publish(msg)
        wall = time.monotonic() - wall_start
        time.sleep(1.0)  # let the last messages arrive
        cpu = _cpu_seconds(recorder.pid) - cpu_start
        recorder.send_signal(signal.SIGINT)
        output, _ = recorder.communicate(timeout=60.0)
    finally:
        if recorder.poll() is None:
            recorder.kill()
        node.destroy_node()
        rclpy.try_shutdown()

    cpu_percent = 100.0 * cpu / wall
    if bare:
        received = int(re.search(r"received (\d+) messages", output).group(1))
        print(f"bare rclpy subscriber: published {total} at {total / wall:.1f} Hz, received "
              f"{received}, CPU {cpu_percent:.1f} %", flush=True)
        return {"published": total, "received": received, "cpu_percent": cpu_percent,
                "exit_code": recorder.returncode}

    from rosbags.rosbag2 import Reader

    from metarl_ros.recording.bag import JointStateDecoder, bag_is_complete

    decoder = JointStateDecoder()
    with Reader(bag) as reader:
        sequence = [decoder(raw).stamp_ns for _, _, raw in reader.messages()]
    missing = sorted(set(range(total)) - set(sequence))
    lost = re.search(r"(\d+) lost before reaching the recorder", output)
    result = {
        "rate_hz": rate, "seconds": seconds, "published": total,
        "achieved_rate_hz": total / wall, "publisher_late_periods": late,
        "recorded": len(sequence), "dropped": total - len(sequence),
        "missing_sequence_numbers": missing[:20], "duplicates": len(sequence) - len(set(sequence)),
        "in_order": sequence == sorted(sequence), "bag_complete": bag_is_complete(bag),
        "recorder_exit_code": recorder.returncode,
        "recorder_reported_lost": int(lost.group(1)) if lost else 0,
        "recorder_cpu_percent": cpu_percent, "bag_mb": sum(
            p.stat().st_size for p in bag.iterdir()) / 1e6,
    }
    print(f"recorder: published {total} at {result['achieved_rate_hz']:.1f} Hz for "
          f"{wall:.1f} s, recorded {len(sequence)}, dropped {result['dropped']}, "
          f"recorder CPU {result['recorder_cpu_percent']:.1f} %, exit "
          f"{recorder.returncode}, bag complete {result['bag_complete']}", flush=True)
    return result


def write_benchmark(folder: Path, messages: int, repeats: int, storage: str) -> dict:
    """The bag writer alone: ``messages`` JointState CDR messages, best of ``repeats``."""
    from metarl_ros.learning.sim_recording import CdrMessages
    from metarl_ros.recording.bag import BagWriter, jazzy_typestore

    cdr = CdrMessages(jazzy_typestore())
    raw = [cdr.joint_state(i, JOINTS, [0.1 * i] * 7, [0.0] * 7, [0.0] * 7) for i in range(1000)]
    best, size, flushes = float("inf"), 0, (0, 0.0)
    for repeat in range(repeats):
        bag = folder / f"write_{repeat}"
        start = time.perf_counter()
        with BagWriter(bag, storage=storage) as writer:
            writer.add_topic("/joint_states", "sensor_msgs/msg/JointState")
            for i in range(messages):
                writer.write("/joint_states", 1_000_000 * i, raw[i % 1000])
            flushed = (getattr(writer, "flushes", 0), getattr(writer, "flush_seconds", 0.0))
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, flushes = elapsed, flushed
        size = sum(p.stat().st_size for p in bag.iterdir())
        shutil.rmtree(bag)
    print(f"writer ({storage}): {messages} messages in {best:.3f} s = "
          f"{messages / best:10.0f} msg/s, {size / best / 1e6:.1f} MB/s; {flushes[0]} flushes "
          f"took {flushes[1]:.3f} s", flush=True)
    return {"storage": storage, "messages": messages, "seconds": best,
            "messages_per_s": messages / best, "mb_per_s": size / best / 1e6,
            "flushes": flushes[0], "flush_seconds": flushes[1]}


def kill_benchmark(folder: Path, trials: int, rate: float, storage: str) -> dict:
    """SIGKILL the recorder at random moments; repair; measure what was lost."""
    import random

    env = loopback_ros_env()
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                           "ROS_LOCALHOST_ONLY")})
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosbags.highlevel import AnyReader
    from sensor_msgs.msg import JointState

    from metarl_ros.recording.bag import JointStateDecoder, repair_bag

    rclpy.init()
    node = Node("bag_kill_publisher")
    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)  # no drops under load
    msg = JointState(name=JOINTS, position=[0.1] * 7, velocity=[0.0] * 7, effort=[0.0] * 7)
    rng = random.Random(20)
    runs = []
    try:
        for trial in range(trials):
            bag = folder / f"killed_{trial}"
            # a topic per trial: a killed recorder stays matched until its DDS lease expires
            topic = f"/joint_states_kill_{trial}"
            publisher = node.create_publisher(JointState, topic, qos)
            recorder = subprocess.Popen(
                [sys.executable, "-m", "metarl_ros.nodes.recorder_node", "--ros-args",
                 "-p", f"output:={bag}", "-p", f"topics:=['{topic}']", "-p",
                 "types:=['sensor_msgs/msg/JointState']", "-p", f"storage:={storage}"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30.0
            while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            kill_after = rng.uniform(1.5, 4.0)
            sent: list[float] = []
            start = time.monotonic()
            while time.monotonic() - start < kill_after:
                msg.header.stamp.sec, msg.header.stamp.nanosec = 0, len(sent)
                publisher.publish(msg)
                sent.append(time.monotonic())
                delay = start + len(sent) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            recorder.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            recorder.wait(timeout=30.0)
            node.destroy_publisher(publisher)
            repair_bag(bag)
            decoder = JointStateDecoder()
            with AnyReader([bag]) as reader:
                got = [decoder(raw).stamp_ns for _, _, raw in reader.messages()]
            missing = sorted(set(range(max(got, default=-1) + 1)) - set(got))
            # (the order may differ: the rmw's receive stamps are not always monotonic)
            run = {"kill_after_s": kill_after, "sent": len(sent), "recovered": len(got),
                   "complete_prefix": sorted(got) == list(range(len(got))),
                   "missing": missing[:20],
                   "lost_s": killed - (sent[max(got)] if got else start)}
            runs.append(run)
            print(f"kill {trial}: after {kill_after:.2f} s, sent {len(sent)}, recovered "
                  f"{len(got)} (prefix {run['complete_prefix']}, missing before the last "
                  f"{len(missing)}), lost {run['lost_s']:.3f} s",
                  flush=True)
            shutil.rmtree(bag, ignore_errors=True)
            shutil.rmtree(folder / f"{bag.name}.orig", ignore_errors=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    lost = [r["lost_s"] for r in runs]
    print(f"SIGKILL ({storage}, {rate:g} Hz): data lost {min(lost):.3f}-{max(lost):.3f} s, "
          f"mean {sum(lost) / len(lost):.3f} s over {len(runs)} kills", flush=True)
    return {"storage": storage, "rate_hz": rate, "runs": runs, "lost_s_max": max(lost),
            "lost_s_mean": sum(lost) / len(lost)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag-seconds", type=float, default=60.0,
                        help="simulated seconds in the read benchmark's bag")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record-seconds", type=float, default=60.0,
                        help="how long to publish to the recorder (the issue asks for 600)")
    parser.add_argument("--rate", type=float, default=500.0, help="joint state rate, Hz")
    parser.add_argument("--skip-read", action="store_true")
    parser.add_argument("--skip-record", action="store_true")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure a bare counting rclpy subscriber the same way")
    parser.add_argument("--write-messages", type=int, default=0,
                        help="also time the bag writer alone on this many messages")
    parser.add_argument("--kill-trials", type=int, default=0,
                        help="SIGKILL the recorder this many times and measure the loss")
    parser.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap",
                        help="storage of the --write-messages and --kill-trials bags")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--bare-subscriber", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_subscriber:
        return bare_subscriber()
    import torch

    torch.set_num_threads(1)
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "load_average": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="bag_benchmark_") as tmp:
        folder = Path(tmp)
        if not args.skip_read:
            report["read"] = read_benchmark(make_bag(folder, args.bag_seconds), args.repeats)
        if not args.skip_record:
            report["record"] = record_benchmark(folder, args.record_seconds, args.rate)
            if args.baseline:
                report["bare_subscriber"] = record_benchmark(folder, args.record_seconds,
                                                             args.rate, bare=True)
        if args.write_messages:
            report["write"] = write_benchmark(folder, args.write_messages, args.repeats,
                                              args.storage)
        if args.kill_trials:
            report["kill"] = kill_benchmark(folder, args.kill_trials, args.rate, args.storage)
    report["machine"]["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
