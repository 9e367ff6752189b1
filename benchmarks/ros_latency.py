"""Sensor-to-command latency of adapter_node / onnx_policy_node vs a bare rclpy echo node.

    .venv/bin/python benchmarks/ros_latency.py [--rate 500] [--duration 10] [--policy pd]
    .venv/bin/python benchmarks/ros_latency.py --nodes echo,adapter,onnx --policy pearl \
        --model models/pearl/model.pt --onnx-model models/pearl/onnx          # issue #5

Two processes: this driver publishes ``/reference`` and ``/joint_states`` at ``--rate`` Hz
(wall clock) and listens on ``/effort_controller/commands``; the node under test runs as a
subprocess -- first a bare rclpy echo node (subscribe JointState, publish Float64MultiArray),
then ``adapter_node`` and/or ``onnx_policy_node`` with their shipped parameter files
(control at the env's 100 Hz, so one joint state in five triggers a command; joint states
are stamped on an exact grid, one state period apart). Every joint state carries its
sequence number in a tiny position offset of joint 1 (1e-6 rad per step), and each command
is matched to the exact state it was computed from:

* ``echo``: the echo returns the positions as data;
* ``stamp`` (``--command-type effort``, any policy): an effort command carries the stamp of
  the joint state it answers in its layout (the lockstep tag, :mod:`metarl_ros.nodes.commands`),
  and the message type is the echo's (std_msgs/Float64MultiArray), so the two differ only by
  what the node does in between;
* ``positions`` (``--command-type trajectory``): the one-point JointTrajectory carries the
  measured positions the efforts were computed from; a bigger message, which the driver (in
  Python) also takes longer to receive.

Latency = command receipt minus joint state publication, both on this process's monotonic
clock. The nodes answer one joint state in five; ``echo_tick`` (``echo_events_tick``) is the
echo answering one in five too, so that the driver receives commands at the same rate from
the baseline as from the nodes: at 100 commands a second a command's trip back to this
driver takes longer than at 500 (``--legs`` shows it: likely its receiving side waking from
idle for each one), so the node's fair yardstick is the echo at its own command rate.
``--legs`` splits each command's latency into intake (the joint state's publication to the
callback's start), callback (to rclpy's publish returning) and return (to the driver's
receipt), from the times the echo and the nodes (through :func:`run_traced_node`) record on
the same monotonic clock.

With ``--rounds R`` every node is measured R times in turn (the load of a shared
machine drifts within minutes: the echo's p99 alone moved 0.7-1.8 ms between runs a few
minutes apart), the latencies of its rounds are pooled, and each node's p99 is given as a
ratio to the echo's, pooled and per round. ``--raw FILE.npz`` keeps every round's latencies,
and ``--pool A.npz B.npz ...`` pools the rounds of several runs (the same ``--nodes``) without
measuring. ``--baseline DIR`` with ``--nodes ...,adapter_baseline,onnx_baseline`` also runs
the nodes of another checkout (``git worktree add DIR <commit>``), interleaved with this
one's: a change measured against its parent in the same minutes. Resident memory
(``VmRSS``, and its peak ``VmHWM``, from ``/proc/<pid>/status``) of each node process is read
at the end of its measured window; ``children_vmrss_mb`` is that of its child processes
(adapter_node with policy pearl, MAML on and ``adaptation_schedule: background`` runs the MAML
adaptation in one: ``metarl_ros.policy.adaptation_process``).

Late ticks are adapter_node's own count (``late_ticks`` / ``ticks`` on /diagnostics:
receipt-to-publish over half a control period, or a gap of more than 1.5 periods), over the
measured window (the counters at the end minus those at the end of the warm-up; the node's
``late_tick_pct`` since its start, warm-up included, is reported as well).

DDS stays on loopback on a domain of this run (ROS_* variables are set for the children).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from loopback import loopback_ros_env  # benchmarks/loopback.py

REPO = Path(__file__).resolve().parent.parent
STEP_RAD = 1e-6
#: commands later than this after the last state are the watchdog's (half its 0.1 s timeout)
WATCHDOG_CUTOFF_S = 0.05


# ---------------------------------------------------------------------------- echo node


TRACE_ENV = "METARL_LATENCY_TRACE"
"""``--legs``: the file (``.npy``) a node under test writes its trace to when it exits: per
command it answered a joint state with, (callback start, rclpy's publish returned), seconds of
``time.perf_counter`` -- the machine's monotonic clock, which the driver reads too."""


def _save_trace(trace: list[tuple[float, float]] | None) -> None:
    """Write ``trace`` whole to :data:`TRACE_ENV`'s file (``--legs``), if it is set."""
    path = os.environ.get(TRACE_ENV)
    if trace is None or not path:
        return
    tmp = f"{path}.tmp.npy"
    np.save(tmp, np.array(trace, dtype=np.float64).reshape(-1, 2))
    os.replace(tmp, path)


def run_echo(executor: str = "single", take_reference: bool = False, every: int = 1) -> int:
    """The baseline: a bare rclpy node echoing joint positions as a command, spun on the
    executor the nodes use for ``executor`` (:func:`metarl_ros.nodes.common.make_executor`);
    ``take_reference``: it also subscribes to ``/reference`` (and does nothing with it), as the
    nodes do; ``every``: it answers one joint state in ``every`` (the first, then every
    ``every``-th), as a node commanding at its control rate does."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node

    from metarl_ros.nodes.common import make_executor, spin
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    rclpy.init()
    node = Node("echo_node")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = node.create_publisher(Float64MultiArray, "/effort_controller/commands", qos)
    trace = [] if os.environ.get(TRACE_ENV) else None
    received = itertools.count()

    def on_joint_state(msg: JointState) -> None:
        start = time.perf_counter()
        if next(received) % every:
            return
        pub.publish(Float64MultiArray(data=list(msg.position)))
        if trace is not None:
            trace.append((start, time.perf_counter()))

    node.create_subscription(JointState, "/joint_states", on_joint_state, qos)
    if take_reference:
        node.create_subscription(JointState, "/reference", lambda msg: None, qos)
    try:
        spinner = make_executor(executor)
        spinner.add_node(node)
        spin(spinner)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        _save_trace(trace)
    return 0


def run_node_echo(ros_args: list[str]) -> int:
    """onnx_policy_node as it runs (its model, timers, services and subscriptions, the
    reference callback preparing each tick), except that its joint-state callback only echoes
    the positions, as the bare echo does: what the node's process costs beyond its tick."""
    from std_msgs.msg import Float64MultiArray

    from metarl_ros.nodes.common import run_node
    from metarl_ros.nodes.onnx_policy_node import OnnxPolicyNode

    class EchoingNode(OnnxPolicyNode):
        def _on_joint_state(self, raw: bytes) -> None:  # the node takes joint states raw
            position = self._joint_states.read(raw).position  # noqa: SLF001 - its reader
            self.commands._publisher.publish(  # noqa: SLF001 - its command publisher
                Float64MultiArray(data=list(position)))

    return run_node(EchoingNode, ros_args)


def run_traced_node(module: str, ros_args: list[str]) -> int:
    """``--legs``: adapter_node or onnx_policy_node (``module``: ``adapter_node`` or
    ``onnx_policy_node``) as it runs, but recording, for each command published at a tick, its
    callback's start and the moment rclpy's publish returned (:data:`TRACE_ENV`); a wrapper
    around the node's own methods, about a microsecond a tick."""
    import importlib

    from metarl_ros.nodes.common import run_node

    class_name = {"adapter_node": "AdapterNode", "onnx_policy_node": "OnnxPolicyNode"}[module]
    base = getattr(importlib.import_module(f"metarl_ros.nodes.{module}"), class_name)
    trace: list[tuple[float, float]] = []

    class TracedNode(base):
        _traced_start: float | None = None  # the callback start of the tick being published

        def _publish(self, result, received: float) -> None:
            self._traced_start = received
            try:
                super()._publish(result, received)
            finally:
                self._traced_start = None

        def _send(self, result, stamp_s: float | None = None) -> None:
            super()._send(result, stamp_s)
            if self._traced_start is not None:  # not a watchdog's safe command
                trace.append((self._traced_start, time.perf_counter()))

    try:
        return run_node(TracedNode, ros_args)
    finally:
        _save_trace(trace)


# ---------------------------------------------------------------------------- driver


class Driver:
    def __init__(self, rate_hz: float) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray

        from metarl_ros.nodes.commands import command_stamp_ns
        from metarl_ros.sim.env_config import load_env_setup

        self.setup = load_env_setup()
        self._stamp_of = command_stamp_ns
        self.names = list(self.setup.robot.joint_names)
        self.q0 = np.asarray(self.setup.robot.default_pose, dtype=np.float64)
        self.rate_hz = rate_hz
        self.JointState = JointState
        rclpy.init()
        self.node = Node("latency_driver")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.states = self.node.create_publisher(JointState, "/joint_states", qos)
        self.refs = self.node.create_publisher(JointState, "/reference", qos)
        from trajectory_msgs.msg import JointTrajectory

        self.node.create_subscription(Float64MultiArray, "/effort_controller/commands",
                                      self._on_command, qos)
        self.node.create_subscription(JointTrajectory, "/effort_controller/joint_trajectory",
                                      self._on_trajectory, qos)
        self.command_topic = "/effort_controller/commands"
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.sent: dict[int, float] = {}
        self.received: list[tuple[float, float]] = []
        self.diag_prefix = "adapter_node"
        self.diag: dict[str, str] = {}
        self.lock = threading.Lock()
        self._spin = threading.Thread(target=rclpy.spin, args=(self.node,), daemon=True)
        self._spin.start()

    def _on_command(self, msg) -> None:
        now = time.perf_counter()
        tag = self._stamp_of(msg)  # the instant an effort command answers (lockstep tag)
        with self.lock:
            self.received.append((msg.data[0] if tag is None else tag, now))

    def _on_trajectory(self, msg) -> None:
        now = time.perf_counter()
        with self.lock:
            self.received.append((msg.points[0].positions[0], now))

    def _decode(self, match: str, value: float) -> int:
        if match == "stamp":
            return int(round((value - self._stamp0_ns) / self._period_ns))
        return int(round((self.q0[0] - value) / STEP_RAD))  # echo data, trajectory positions

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith(self.diag_prefix):
                self.diag = {kv.key: kv.value for kv in status.values}

    def connected(self) -> bool:
        return (self.states.get_subscription_count() > 0
                and self.node.count_publishers(self.command_topic) > 0)

    def publish(self, seq: int, stamp_ns: int, ahead_ns: int = 0) -> None:
        """The joint state of instant ``stamp_ns`` and a reference: of the same instant,
        published first; or (``ahead_ns`` > 0, a preview) of the instant ``ahead_ns`` later,
        published after the joint state."""
        from builtin_interfaces.msg import Time

        def stamp(ns: int) -> Time:
            return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)

        n = len(self.names)
        ref = self.JointState(name=self.names, position=self.q0.tolist(),
                              velocity=[0.0] * n, effort=[0.0] * n)
        ref.header.stamp = stamp(stamp_ns + ahead_ns)
        q = self.q0.copy()
        q[0] -= seq * STEP_RAD
        state = self.JointState(name=self.names, position=q.tolist(), velocity=[0.0] * n,
                                effort=[0.0] * n)
        state.header.stamp = stamp(stamp_ns)
        if not ahead_ns:
            self.refs.publish(ref)
        self.sent[seq] = time.perf_counter()
        self.states.publish(state)
        if ahead_ns:
            self.refs.publish(ref)

    def run(self, mode: str, warmup_s: float, duration_s: float, match: str,
            decimation: int, pid: int | None = None, ahead_s: float = 0.0) -> dict:
        """Publish for ``warmup_s + duration_s``; match each command to its state (``echo``,
        ``stamp`` or ``positions``); statistics of the measured part. ``decimation``: states
        per control tick."""
        load_before = os.getloadavg()[0]
        with self.lock:
            self.received.clear()
        self.sent.clear()
        self.diag = {}
        period = 1.0 / self.rate_hz
        period_ns = int(round(1e9 / self.rate_hz))
        stamp0_ns = self.node.get_clock().now().nanoseconds
        self._stamp0_ns, self._period_ns = stamp0_ns, period_ns
        total = int((warmup_s + duration_s) * self.rate_hz)
        first_measured = int(warmup_s * self.rate_hz)
        start = time.perf_counter()
        diag_at_start: dict[str, str] = {}
        for seq in range(1, total + 1):
            deadline = start + seq * period
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if seq == first_measured:
                diag_at_start = dict(self.diag)  # counters at the end of the warm-up
            self.publish(seq, stamp0_ns + seq * period_ns, int(round(ahead_s * 1e9)))
        last_publish = time.perf_counter()
        time.sleep(0.5)
        memory = _memory(pid) if pid is not None else {}
        with self.lock:
            received = list(self.received)
        # Once the states stop, the node's watchdog commands its safe action (after
        # watchdog_timeout, 0.1 s): it carries the last state's positions but answers no state.
        received = [(value, t) for value, t in received if t <= last_publish + WATCHDOG_CUTOFF_S]
        matched = [(self._decode(match, value), t) for value, t in received]
        # the first command per state (the watchdog repeats a safe command once they stop)
        first: dict[int, float] = {}
        for seq, t in matched:
            first.setdefault(seq, t)
        answered = [(self.sent[s], t) for s, t in first.items()
                    if s >= first_measured and s in self.sent]
        latencies = [t - sent for sent, t in answered]
        measured_states = total - first_measured + 1
        lat = np.array(latencies) * 1e3
        result = {
            "mode": mode,
            "match": match,
            "latencies_ms": lat,  # pooled over rounds by main(), not written
            "answered_s": np.array(answered).reshape(-1, 2),  # (sent, receipt); not written
            "load_average_1min_before": round(load_before, 2),
            "states_published": measured_states,
            "control_ticks_expected": (total - first_measured) // decimation + 1,
            "commands_matched": len(lat),
            "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "latency_max_ms": float(lat.max()) if len(lat) else float("nan"),
            "achieved_rate_hz": total / (time.perf_counter() - start - 0.5),
        }
        result.update(memory)
        if not mode.startswith("echo"):  # a node with diagnostics
            time.sleep(1.0)  # one more diagnostics message
            # the node's counters over the measured window (minus those at its start; the
            # diagnostics come at 5 Hz, so the window edge is within 0.2 s)
            ticks = int(self.diag.get("ticks", "0")) - int(diag_at_start.get("ticks", "0"))
            late = (int(self.diag.get("late_ticks", "0"))
                    - int(diag_at_start.get("late_ticks", "0")))
            result["late_tick_pct"] = 100.0 * late / ticks if ticks > 0 else float("nan")
            result["node_ticks"] = ticks
            result["late_tick_pct_since_start"] = float(self.diag.get("late_tick_pct", "nan"))
            result["inference_p50_ms"] = float(self.diag.get("inference_latency_p50_ms", "nan"))
            result["inference_p99_ms"] = float(self.diag.get("inference_latency_p99_ms", "nan"))
            # receipt to publish inside the node (its last 2000 ticks): the rest of the
            # latency is transport and executor
            result["node_command_p50_ms"] = float(self.diag.get("command_latency_p50_ms", "nan"))
            result["node_command_p99_ms"] = float(self.diag.get("command_latency_p99_ms", "nan"))
        return result

    def close(self) -> None:
        import rclpy

        self.node.destroy_node()
        rclpy.try_shutdown()


def _memory(pid: int) -> dict[str, float]:
    """Resident memory of a process: VmRSS (now) and VmHWM (peak), in MB; and the VmRSS of
    its children (e.g. adapter_node's MAML adaptation process), if it has any."""
    values = _status_mb(pid)
    children = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += (task / "children").read_text().split()
    except OSError:
        pass
    if children:
        values["children_vmrss_mb"] = round(sum(_status_mb(int(child)).get("vmrss_mb", 0.0)
                                                for child in children), 1)
    return values


def _status_mb(pid: int) -> dict[str, float]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[f"{key.lower()}_mb"] = round(int(rest.split()[0]) / 1024.0, 1)
    except OSError:
        pass
    return values


NODE_CPUS: set[int] | None = None
"""``--pin``: the CPUs the nodes under test (and their children) may run on."""


def _start(cmd: list[str], source: Path = REPO, trace: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` with this run's loopback ROS environment, importing ``metarl_ros`` from
    ``source`` (a checkout: ``python -m`` puts the working directory first on the path), on
    :data:`NODE_CPUS` if set; ``trace``: where it writes its trace (``--legs``)."""
    env = loopback_ros_env()
    if trace is not None:
        env[TRACE_ENV] = str(trace)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(source), env.get("PYTHONPATH"))))
    cpus = NODE_CPUS
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    return subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=pin)


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LEGS = ("intake", "callback", "return")
"""``--legs``: a command's latency in three parts -- the joint state's publication to the
callback's start (transport, the executor's wake-up and take), the callback's start to rclpy's
publish returning (the node's work), and that to the driver's receipt (transport and the
driver's wake-up)."""


def legs_ms(answered_s: np.ndarray, trace_s: np.ndarray) -> np.ndarray:
    """(n, 3) ms: :data:`LEGS` of each answered joint state ``answered_s`` (n, 2: sent,
    receipt), matched to the node's trace ``trace_s`` (m, 2: callback start, publish returned;
    sorted): the last callback that started after the joint state's publication and published
    before the command's receipt. A command with no such callback is left out."""
    starts, published = trace_s[:, 0], trace_s[:, 1]
    rows = []
    for sent, receipt in answered_s:
        i = int(np.searchsorted(published, receipt, side="right")) - 1
        if i >= 0 and starts[i] >= sent:
            rows.append((starts[i] - sent, published[i] - starts[i], receipt - published[i]))
    return np.array(rows, dtype=np.float64).reshape(-1, 3) * 1e3


def measure(driver: Driver, mode: str, cmd: list[str], warmup_s: float,
            duration_s: float, match: str = "echo", decimation: int = 1,
            diag_prefix: str = "", ahead_s: float = 0.0, source: Path = REPO,
            trace: Path | None = None) -> dict:
    """One node's round: start ``cmd``, drive it, stop it; ``trace``: the file it writes its
    trace to (``--legs``; read after it stops, for ``legs_ms``)."""
    driver.diag_prefix = diag_prefix or mode
    driver.command_topic = ("/effort_controller/joint_trajectory" if match == "positions"
                            else "/effort_controller/commands")
    if trace is not None:
        trace.unlink(missing_ok=True)
    proc = _start(cmd, source, trace)
    try:
        deadline = time.monotonic() + 30
        while not driver.connected():
            if proc.poll() is not None:
                raise RuntimeError(f"{mode} exited: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: no connection within 30 s")
            time.sleep(0.05)
        time.sleep(0.5)
        result = driver.run(mode, warmup_s, duration_s, match, decimation, proc.pid, ahead_s)
        if not len(result["latencies_ms"]):
            exited = proc.poll()
            raise RuntimeError(f"{mode}: no command matched a joint state in {duration_s} s"
                               + (f" (it exited {exited})" if exited is not None else ""))
    finally:
        _stop(proc)
    if trace is not None:
        if not trace.is_file():
            raise RuntimeError(f"{mode}: --legs, but it wrote no trace to {trace}")
        result["legs_ms"] = legs_ms(result["answered_s"], np.load(trace))
        trace.unlink()
    return result


UNWRITTEN = ("latencies_ms", "answered_s", "legs_ms")
"""A round's arrays: pooled, not written to the JSON."""

ECHOES = ("echo", "echo_events", "echo_tick", "echo_events_tick")
"""The baselines each node's p99 is given against (those measured)."""


def pool_rounds(rounds: list[dict]) -> dict:
    """Per node: the latencies of every round pooled (``latency_*`` of the pool; the other
    figures are the last round's, but for ``node_command_*_ms_median_of_rounds``), and with
    an ``echo`` in the rounds each node's p99 against the echo's: as a ratio, pooled
    (``p99_x_echo``) and per round (``p99_x_echo_per_round``, each against the echo measured
    in the same round; ``..._median_quartiles`` of those), and as the difference of the pooled
    p99s in ms (``p99_above_echo_ms``); likewise ``*_echo_events`` against the echo spun on
    the EventsExecutor, and ``*_echo_tick`` / ``*_echo_events_tick`` against those echoes
    answering one joint state per control tick. With ``--legs``, ``legs_p50_ms`` and
    ``legs_p99_ms``: each of :data:`LEGS`, pooled."""
    pooled: dict[str, dict] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        lat = np.concatenate([run["latencies_ms"] for run in runs])
        entry = {k: v for k, v in runs[-1].items() if k not in UNWRITTEN}
        entry.update({
            "commands_matched": int(lat.size),
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "latency_max_ms": float(lat.max()) if lat.size else float("nan"),
        })
        if "node_command_p50_ms" in runs[0]:  # the node's own receipt-to-publish time
            for q in ("p50", "p99"):
                entry[f"node_command_{q}_ms_median_of_rounds"] = float(np.median(
                    [run[f"node_command_{q}_ms"] for run in runs]))
        if all("legs_ms" in run for run in runs):
            legs = np.concatenate([run["legs_ms"] for run in runs])
            entry["legs_matched"] = len(legs)
            for q in (50, 99):
                entry[f"legs_p{q}_ms"] = (
                    {leg: float(np.percentile(legs[:, i], q)) for i, leg in enumerate(LEGS)}
                    if len(legs) else {})
        if "late_tick_pct" in runs[0]:
            ticks = sum(run["node_ticks"] for run in runs)
            late = sum(run["late_tick_pct"] * run["node_ticks"] / 100.0 for run in runs
                       if run["node_ticks"])
            entry["node_ticks"] = ticks
            entry["late_tick_pct"] = 100.0 * late / ticks if ticks else float("nan")
        pooled[name] = entry
    for echo in ECHOES:
        if echo not in pooled:
            continue
        for name, entry in pooled.items():
            if name.startswith("echo"):
                continue
            entry[f"p99_x_{echo}"] = (entry["latency_p99_ms"]
                                      / pooled[echo]["latency_p99_ms"])
            entry[f"p99_x_{echo}_per_round"] = per_round = [
                float(np.percentile(r[name]["latencies_ms"], 99)
                      / np.percentile(r[echo]["latencies_ms"], 99)) for r in rounds]
            entry[f"p99_x_{echo}_per_round_median_quartiles"] = [
                float(v) for v in np.percentile(per_round, [50, 25, 75])]
            entry[f"p99_above_{echo}_ms"] = (entry["latency_p99_ms"]
                                             - pooled[echo]["latency_p99_ms"])
    return pooled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="joint state rate, Hz")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds each")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--nodes", default="echo,adapter",
                        help="comma-separated, measured in this order: echo, echo_events "
                             "(the echo on rclpy's EventsExecutor), echo_tick and "
                             "echo_events_tick (those echoes answering one joint state per "
                             "control tick, as the nodes do), echo_events_reference (that "
                             "echo subscribed to /reference too), adapter (adapter_node), "
                             "onnx (onnx_policy_node), onnx_echo (onnx_policy_node whose "
                             "joint-state callback only echoes), adapter_baseline and "
                             "onnx_baseline (those nodes from the --baseline checkout)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="a checkout of another commit (e.g. `git worktree add DIR HEAD~1`) "
                             "whose nodes run as adapter_baseline / onnx_baseline, with this "
                             "checkout's parameter files and models: an A/B in one run")
    parser.add_argument("--policy", default="pd", help="adapter_node policy (pd|pearl|onnx)")
    parser.add_argument("--model", default="", help="adapter_node model_path (pearl, onnx)")
    parser.add_argument("--no-maml", action="store_true",
                        help="adapter_node maml:=false (pearl: posterior only, no MAML thread)")
    parser.add_argument("--onnx-model", default="models/pearl/onnx",
                        help="onnx_policy_node model_path (a `metarl export` directory)")
    parser.add_argument("--onnx-posterior-update", choices=("tick", "context"), default="tick",
                        help="onnx_policy_node posterior_update")
    parser.add_argument("--command-type", choices=("effort", "trajectory"), default="effort",
                        help="command_type of adapter_node and onnx_policy_node (effort: the "
                             "echo's message type)")
    parser.add_argument("--adapter-threads", type=int, default=1,
                        help="adapter_node executor_threads (1 = SingleThreadedExecutor)")
    parser.add_argument("--executor", choices=("single", "events"), default="single",
                        help="the nodes' executor parameter (events: rclpy's EventsExecutor)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the nodes this many times, in turn (echo, adapter, onnx, "
                             "echo, ...): the machine's load drifts within minutes, so a ratio "
                             "is only fair between runs close in time")
    parser.add_argument("--reference-ahead", type=float, default=0.0, metavar="S",
                        help="publish each instant's reference S seconds before it (after the "
                             "joint state of the instant it is sent at): a preview; 0 = with "
                             "its joint state, just before it")
    parser.add_argument("--act-ahead", choices=("true", "false"),
                        help="the nodes' act_ahead (default: their parameter files')")
    parser.add_argument("--echo", choices=("single", "events"), help=argparse.SUPPRESS)
    parser.add_argument("--echo-takes-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo-every", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--traced-node", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--legs", action="store_true",
                        help="split each command's latency into intake (publication to the "
                             "callback's start), callback (to rclpy's publish returning) and "
                             "return (to the driver's receipt): the echoes and nodes record "
                             "their callbacks (the nodes through a wrapper of their own "
                             "methods, about a microsecond a tick)")
    parser.add_argument("--node-echo", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--pin", metavar="DRIVER:NODES",
                        help="CPU lists, e.g. 0:1: this driver on the first, every node under "
                             "test (echoes included) on the second")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--raw", type=Path, metavar="NPZ",
                        help="also write every round's latencies (ms) here, for --pool")
    parser.add_argument("--pool", type=Path, nargs="+", metavar="NPZ",
                        help="measure nothing: pool the rounds of these --raw files (runs with "
                             "the same --nodes) and print the pooled figures")
    args = parser.parse_args(argv)
    if args.echo:
        return run_echo(args.echo, args.echo_takes_reference, args.echo_every)
    if args.traced_node is not None:
        return run_traced_node(args.traced_node[0], ["ros_latency"] + args.traced_node[1:])
    if args.node_echo is not None:
        return run_node_echo(["ros_latency"] + args.node_echo)
    if args.pool:
        return print_pooled(args.pool)
    nodes = [name.strip() for name in args.nodes.split(",") if name.strip()]
    unknown = sorted(set(nodes) - {*ECHOES, "echo_events_reference", "adapter",
                                   "onnx", "onnx_echo", "adapter_baseline", "onnx_baseline"})
    if unknown:
        parser.error(f"unknown --nodes {unknown}")
    if any(name.endswith("_baseline") for name in nodes):
        if args.baseline is None:
            parser.error("--nodes *_baseline needs --baseline DIR")
        if not (args.baseline / "metarl_ros" / "nodes" / "adapter_node.py").is_file():
            parser.error(f"--baseline {args.baseline}: not a metarl_ros checkout "
                         "(no metarl_ros/nodes/adapter_node.py)")
        args.baseline = args.baseline.resolve()
    # model paths as given are relative to this checkout; the baseline runs in its own
    args.model = str(REPO / args.model) if args.model else ""
    args.onnx_model = str(REPO / args.onnx_model)
    if args.pin:
        global NODE_CPUS
        try:
            driver_cpus, node_cpus = ({int(c) for c in part.split(",")}
                                      for part in args.pin.split(":"))
            os.sched_setaffinity(0, driver_cpus)  # before rclpy starts this driver's threads
        except (ValueError, OSError) as exc:
            parser.error(f"--pin {args.pin}: {exc} (expected e.g. 0:1 or 0:1,2)")
        NODE_CPUS = node_cpus
    os.environ.update(loopback_ros_env())
    driver = Driver(args.rate)
    decimation = max(1, int(round(args.rate / driver.setup.config.control_rate_hz)))
    match = "positions" if args.command_type == "trajectory" else "stamp"
    common = ["-p", "use_sim_time:=false", "-p", "diagnostics_rate_hz:=5.0",
              "-p", f"executor_threads:={args.adapter_threads}",
              "-p", f"executor:={args.executor}"]
    if args.act_ahead:
        common += ["-p", f"act_ahead:={args.act_ahead}"]
    adapter_cmd = [sys.executable, "-m", "metarl_ros.nodes.adapter_node", "--ros-args",
                   "--params-file", str(REPO / "config" / "adapter_node.yaml"),
                   "-p", f"policy:={args.policy}", "-p", f"command_type:={args.command_type}",
                   "-p", f"maml:={'false' if args.no_maml else 'true'}", *common]
    if args.model:
        adapter_cmd += ["-p", f"model_path:={args.model}"]
    onnx_cmd = [sys.executable, "-m", "metarl_ros.nodes.onnx_policy_node", "--ros-args",
                "--params-file", str(REPO / "config" / "onnx_policy_node.yaml"),
                "-p", f"model_path:={args.onnx_model}", "-p", f"command_type:={args.command_type}",
                "-p", f"posterior_update:={args.onnx_posterior_update}",
                *common]
    traces = Path(tempfile.mkdtemp(prefix="ros_latency_")) if args.legs else None

    def trace(name: str) -> Path | None:
        return None if traces is None else traces / f"{name}.npy"

    onnx_ros_args = onnx_cmd[3:]
    if args.legs:  # the nodes run through run_traced_node
        adapter_cmd = [sys.executable, __file__, "--traced-node", "adapter_node",
                       *adapter_cmd[3:]]
        onnx_cmd = [sys.executable, __file__, "--traced-node", "onnx_policy_node",
                    *onnx_ros_args]

    def echo(name: str, executor: str, every: int = 1, take_reference: bool = False) -> dict:
        reference = ["--echo-takes-reference"] if take_reference else []
        return measure(driver, name, [sys.executable, __file__, "--echo", executor,
                                      "--echo-every", str(every), *reference],
                       args.warmup, args.duration, ahead_s=args.reference_ahead,
                       trace=trace(name))

    runs = {
        "echo": lambda: echo("echo", "single"),
        "echo_events": lambda: echo("echo_events", "events"),
        "echo_tick": lambda: echo("echo_tick", "single", decimation),
        "echo_events_tick": lambda: echo("echo_events_tick", "events", decimation),
        "echo_events_reference": lambda: echo("echo_events_reference", "events",
                                              take_reference=True),
        "adapter": lambda: measure(driver, "adapter", adapter_cmd, args.warmup, args.duration,
                                   match, decimation, "adapter_node", args.reference_ahead,
                                   trace=trace("adapter")),
        "onnx_echo": lambda: measure(driver, "onnx_echo",
                                     [sys.executable, __file__, "--node-echo", *onnx_ros_args],
                                     args.warmup, args.duration, ahead_s=args.reference_ahead),
        "onnx": lambda: measure(driver, "onnx", onnx_cmd, args.warmup, args.duration,
                                match, decimation, "onnx_policy_node", args.reference_ahead,
                                trace=trace("onnx")),
        "adapter_baseline": lambda: measure(driver, "adapter_baseline", adapter_cmd,
                                            args.warmup, args.duration, match, decimation,
                                            "adapter_node", args.reference_ahead,
                                            args.baseline, trace("adapter_baseline")),
        "onnx_baseline": lambda: measure(driver, "onnx_baseline", onnx_cmd, args.warmup,
                                         args.duration, match, decimation, "onnx_policy_node",
                                         args.reference_ahead, args.baseline,
                                         trace("onnx_baseline")),
    }
    rounds: list[dict] = []
    try:
        for _ in range(args.rounds):
            rounds.append({name: runs[name]() for name in nodes})
    finally:
        driver.close()
        if traces is not None:
            shutil.rmtree(traces, ignore_errors=True)
    measured = pool_rounds(rounds)
    results = {
        "command": "python benchmarks/ros_latency.py " + " ".join(argv or sys.argv[1:]),
        "rate_hz": args.rate, "duration_s": args.duration, "policy": args.policy,
        "command_type": args.command_type, "maml": not args.no_maml,
        "model": args.model, "onnx_model": args.onnx_model,
        "onnx_posterior_update": args.onnx_posterior_update,
        "adapter_threads": args.adapter_threads,
        "executor": args.executor,
        "rounds": args.rounds,
        "reference_ahead_s": args.reference_ahead,
        "act_ahead": args.act_ahead or "parameter files",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.2f}",
        "pin": args.pin,
        "legs": args.legs,
        **measured,
        "per_round": [{name: {k: v for k, v in run.items() if k not in UNWRITTEN}
                       for name, run in r.items()} for r in rounds],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.raw:
        write_raw(args.raw, rounds)
    return 0


def write_raw(path: Path, rounds: list[dict]) -> None:
    """Every round's latencies (ms) as ``<node>.r<round>`` arrays of an ``.npz``, written
    whole (a temporary file renamed into place)."""
    arrays = {f"{name}.r{i}": run["latencies_ms"] for i, r in enumerate(rounds)
              for name, run in r.items()}
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_raw(path: Path) -> list[dict]:
    """The rounds of a :func:`write_raw` file: ``[{node: {"latencies_ms": array}}, ...]``."""
    rounds: dict[int, dict] = {}
    with np.load(path) as data:
        for key in data.files:
            name, _, index = key.rpartition(".r")
            if not name or not index.isdigit():
                raise SystemExit(f"--pool {path}: {key!r} is not a <node>.r<round> array: not a "
                                 "--raw file")
            rounds.setdefault(int(index), {})[name] = {"latencies_ms": data[key]}
    return [rounds[i] for i in sorted(rounds)]


def print_pooled(paths: list[Path]) -> int:
    """``--pool``: the pooled figures of the rounds of several ``--raw`` files."""
    rounds: list[dict] = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--pool {path}: no such file")
        try:
            more = read_raw(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--pool {path}: not a --raw file ({exc})") from None
        if rounds and more and set(more[0]) != set(rounds[0]):
            raise SystemExit(f"--pool {path}: nodes {sorted(more[0])}, but the first file has "
                             f"{sorted(rounds[0])}")
        rounds += more
    if not rounds:
        raise SystemExit("--pool: the files hold no rounds")
    results = {"files": [str(p) for p in paths], "rounds": len(rounds), **pool_rounds(rounds)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
