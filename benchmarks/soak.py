"""Soak test (issue #20): the adapt_sim graph with recording, in real time, for an hour.

    ROS_DOMAIN_ID=61 .venv/bin/python benchmarks/soak.py [--duration 3600] [--sample-period 30]
        [--warmup 60] [--out runs/soak-<date>] [--json <out>/soak.json] [--per-node]

Starts the graph as a user does -- ``metarl launch adapt_sim policy:=pearl maml:=true
record:=true bag:=<out>/bag`` (the shipped models/pearl/model.pt, the MAML adaptation in
adapter_node's child process -- ``adaptation_schedule: background``, whose memory this script
does not sample: sample it beside, e.g. ``pgrep -P <metarl pid>``; physics at 500 Hz paced at
real_time_factor 1; /joint_states, /reference, /clock and the commands at the env's control
rate, 100 Hz -- sim_node's joint_state_rate_hz is no launch argument; the latent at 10 Hz).
``metarl launch`` runs recorder_node, sim_node and adapter_node in **one process** (one GIL),
so its memory is the graph's but for the adaptation child; ``--per-node`` starts each node of
the same graph description as its own executable (what ``ros2 launch metarl_ros
adapt_sim.launch.py`` does) and reports memory per node.

The clock starts when the first command is seen. Every ``--sample-period`` s: VmRSS and CPU
time of each process (``/proc/<pid>``), adapter_node's and sim_node's last /diagnostics, and
this script's own counts of /joint_states and commands (rates). After ``--duration`` s (or
Ctrl-C): SIGINT to the graph (a clean shutdown closes the bag), then the bag is read with the
package's reader (``open_reader``, and ``read_bag`` as ``metarl retrain`` does), rosbags'
``Reader`` and, for MCAP, the ``mcap`` reader. Checked: counts per topic (readers,
metadata.yaml and what recorder_node logged writing must agree), receive times in file order
(must not go back), and the sim instants of /joint_states, /reference (header stamps) and
commands (the instant each answers, its lockstep tag): missing instants are dropped messages,
exactly; gaps > 3 periods, in sim and receive time. Other topics: expected = rate x span.
recorder_node publishes no /diagnostics: its counts and publisher sequence gaps come from the
line it logs closing the bag. Also reported: the tracking error |q_ref - q| from the bag (a
graph that cannot keep real time stops tracking).

RSS growth = slope of a linear fit over the samples after ``--warmup`` (MB/h). Late ticks are
adapter_node's counters (since its start, and over the window after the warm-up). Exit status
1 if a process died or stalled, the shutdown was not clean, or the bag fails its checks.
DDS stays on loopback (benchmarks/loopback.py); set ROS_DOMAIN_ID to a free domain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
from loopback import loopback_ros_env  # benchmarks/loopback.py

REPO = Path(__file__).resolve().parent.parent
LAUNCH_ARGS = ["policy:=pearl", "model:=models/pearl/model.pt", "maml:=true", "record:=true",
               "real_time_factor:=1.0"]
COMMANDS = "/effort_controller/commands"
#: topics with one message per sim instant: header stamp, or the instant a command answers
GRID_TOPICS = ("/joint_states", "/reference", COMMANDS)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- processes


def start_graph(bag: Path, out: Path, per_node: bool,
                launch_args: list[str]) -> dict[str, subprocess.Popen]:
    """The graph's processes by name, logs in ``out/<name>.log``."""
    env = loopback_ros_env()
    if not per_node:
        cmd = [str(REPO / ".venv/bin/metarl"), "launch", "adapt_sim", *launch_args,
               f"bag:={bag}"]
        return {"metarl_launch": _spawn(cmd, out / "metarl_launch.log", env)}
    from metarl_ros.graph.spec import adapt_sim_graph, parameter_file_path

    graph = adapt_sim_graph(dict(a.split(":=") for a in [*launch_args, f"bag:={bag}"]))
    procs = {}
    for spec in graph.nodes:  # recorder first, as the graph lists it
        overrides = out / f"{spec.name}.params.yaml"
        overrides.write_text(yaml.safe_dump({spec.name: {"ros__parameters":
                                                         dict(spec.parameters)}}))
        cmd = [str(REPO / ".venv/bin" / spec.executable), "--ros-args", "-r",
               f"__node:={spec.name}"]
        for path in [*map(parameter_file_path, spec.parameter_files), overrides]:
            cmd += ["--params-file", str(path)]
        procs[spec.name] = _spawn(cmd, out / f"{spec.name}.log", env)
    return procs


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)


def stop_graph(procs: dict[str, subprocess.Popen], timeout_s: float = 60.0) -> dict[str, Any]:
    """SIGINT to every process, then their exit codes (``killed`` after ``timeout_s``).
    Another Ctrl-C meanwhile is ignored: the recorder is closing the bag."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    codes: dict[str, Any] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes[name] = "killed"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return codes


def proc_sample(pid: int) -> tuple[float, float]:
    """(VmRSS in MB, CPU seconds used) of a process; NaN if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    rss_kb = re.search(r"^VmRSS:\s+(\d+)", status, re.M)  # none in a zombie
    return (int(rss_kb.group(1)) / 1024.0 if rss_kb else float("nan"),
            (int(stat[11]) + int(stat[12])) / CLK_TCK)  # utime + stime


# ---------------------------------------------------------------------------- monitor


class Monitor:
    """A node in this process: counts /joint_states and commands (raw: no decoding) and keeps
    the last /diagnostics values of each status."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rclpy.signals import SignalHandlerOptions
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray

        rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)  # Ctrl-C: main()
        self.node = rclpy.create_node("soak_monitor")
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.counts: Counter = Counter()
        self.diag: dict[str, dict[str, str]] = {}
        for topic, cls in (("/joint_states", JointState), (COMMANDS, Float64MultiArray)):
            self.node.create_subscription(cls, topic, self._counter(topic), qos, raw=True)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _counter(self, topic: str):
        def count(_: bytes) -> None:
            self.counts[topic] += 1
        return count

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            self.diag[status.name.split(":")[0]] = {kv.key: kv.value for kv in status.values}

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown()


#: /diagnostics values sampled, per node
DIAG_KEYS = {"adapter_node": ("ticks", "late_ticks", "safe_ticks", "policy_errors",
                              "rejected_joint_states", "rejected_references", "stale_events",
                              "inference_latency_p50_ms", "inference_latency_p99_ms"),
             "sim_node": ("sim_time_s", "real_time_factor_achieved", "overruns",
                          "commands_rejected")}


def take_sample(t: float, procs: dict[str, subprocess.Popen], mon: Monitor) -> dict[str, Any]:
    sample: dict[str, Any] = {"t_s": round(t, 1), "load_1min": os.getloadavg()[0]}
    for name, proc in procs.items():
        sample[f"rss_mb.{name}"], sample[f"cpu_s.{name}"] = proc_sample(proc.pid)
    sample.update({f"received{topic}": n for topic, n in mon.counts.items()})
    for node, keys in DIAG_KEYS.items():
        values = mon.diag.get(node, {})
        sample.update({f"{node}.{key}": float(values.get(key, "nan")) for key in keys})
    return sample


# ---------------------------------------------------------------------------- bag


def file_order_messages(bag: Path, storage: str) -> Iterator[tuple[str, int, bytes]]:
    """(topic, log time ns, raw CDR) as stored: mcap's own reader, else rosbags'."""
    if storage == "mcap":
        from mcap.reader import make_reader

        for path in sorted(bag.glob("*.mcap")):
            with path.open("rb") as handle:
                for _, channel, msg in make_reader(handle).iter_messages(log_time_order=False):
                    yield channel.topic, msg.log_time, msg.data
    else:
        from rosbags.rosbag2 import Reader

        with Reader(bag) as reader:
            for conn, stamp, raw in reader.messages():
                yield conn.topic, stamp, raw


def command_instant(raw: bytes) -> int:
    """The sim instant (ns) an effort command answers: its ``layout.dim[0].label`` tag
    (metarl_ros.nodes.commands; little-endian CDR), -1 if untagged."""
    from metarl_ros.nodes.commands import STAMP_LABEL

    if not int.from_bytes(raw[4:8], "little"):
        return -1
    label = bytes(raw[12:11 + int.from_bytes(raw[8:12], "little")]).decode()
    return int(label[len(STAMP_LABEL):]) if label.startswith(STAMP_LABEL) else -1


def time_checks(bag: Path, storage: str, rates: dict[str, float]) -> dict[str, dict]:
    """Per topic: count, receive times going back, gaps > 3 periods (receive time; and the
    sim instants of the grid topics, whose missing instants are dropped messages)."""
    from metarl_ros.recording.cdr import JointStateDecoder

    log: dict[str, list[int]] = defaultdict(list)
    stamps: dict[str, list[int]] = defaultdict(list)
    decoders = {topic: (lambda raw, d=JointStateDecoder(): d.decode(raw)[0])
                for topic in ("/joint_states", "/reference")}
    decoders[COMMANDS] = command_instant
    for topic, log_ns, raw in file_order_messages(bag, storage):
        log[topic].append(log_ns)
        if topic in decoders:
            stamps[topic].append(decoders[topic](raw))
    result = {}
    for topic, times in sorted(log.items()):
        period_ns = 1e9 / rates[topic] if topic in rates else None
        steps = np.diff(np.asarray(times, dtype=np.int64))
        entry = {"count_file_order": len(times), "log_time_backwards": int((steps < 0).sum()),
                 "log_span_s": (times[-1] - times[0]) * 1e-9, "max_log_gap_ms": 0.0}
        if steps.size:
            entry["max_log_gap_ms"] = float(steps.max()) * 1e-6
        if period_ns and steps.size:
            entry["log_gaps_over_3_periods"] = int((steps > 3 * period_ns).sum())
        if topic in stamps:
            entry.update(grid_check(np.asarray(stamps[topic], dtype=np.int64),
                                    np.asarray(times, dtype=np.int64), period_ns))
        result[topic] = entry
    return result


def grid_check(stamp: np.ndarray, log: np.ndarray, period_ns: float) -> dict[str, Any]:
    """Sim instants of a topic sent once per sim period (t = 0 repeats while sim_node waits
    for its controller): missing instants, repeats, going back, gaps; wall span once running."""
    untagged = int((stamp < 0).sum())
    log, stamp = log[stamp >= 0], stamp[stamp >= 0]
    steps, unique = np.diff(stamp), np.unique(stamp)
    expected = int(round((unique[-1] - unique[0]) / period_ns)) + 1
    running = log[stamp > stamp[0]]
    return {"sim_span_s": (unique[-1] - unique[0]) * 1e-9, "expected_on_grid": expected,
            "missing_instants": expected - unique.size,
            "t0_repeats": int((stamp == stamp[0]).sum() - 1),
            "repeats_after_t0": int((steps[stamp[1:] > stamp[0]] == 0).sum()),
            "stamp_backwards": int((steps < 0).sum()),
            "stamp_gaps_over_3_periods": int((steps > 3 * period_ns).sum()),
            "wall_span_running_s": (running[-1] - running[0]) * 1e-9 if running.size else 0.0,
            "untagged": untagged}


def tracking_error(bag: Path, storage: str) -> dict[str, float]:
    """|q_ref - q| (rad, norm over the joints) at each instant with both messages: a graph that
    cannot keep real time stops tracking. Mean, p99, max; mean over the last tenth (drift)."""
    from metarl_ros.recording.cdr import JointStateDecoder

    position: dict[str, dict[int, np.ndarray]] = {"/joint_states": {}, "/reference": {}}
    decoders = {topic: JointStateDecoder() for topic in position}
    for topic, _, raw in file_order_messages(bag, storage):
        if topic in position:
            msg = decoders[topic](raw)
            position[topic][msg.stamp_ns] = msg.position
    both = sorted(position["/joint_states"].keys() & position["/reference"].keys())
    error = np.array([np.linalg.norm(position["/reference"][k] - position["/joint_states"][k])
                      for k in both])
    if not error.size:
        return {}
    stats = {"mean": error.mean(), "p99": np.percentile(error, 99), "max": error.max(),
             "mean_last_tenth": error[-max(1, error.size // 10):].mean()}
    return {key: round(float(value), 4) for key, value in stats.items()}


def reader_counts(bag: Path) -> dict[str, dict[str, int]]:
    """Messages per topic by the package's reader and rosbags', and in metadata.yaml."""
    from rosbags.rosbag2 import Reader

    from metarl_ros.learning.bag_streams import open_reader

    counts: dict[str, dict[str, int]] = {}
    reader = open_reader(bag)  # the package's: check_bag_folder + AnyReader, Jazzy types
    try:
        counts["package (AnyReader)"] = dict(Counter(c.topic for c, _, _ in reader.messages()))
    finally:
        reader.close()
    with Reader(bag) as raw_reader:
        counts["rosbags Reader"] = dict(Counter(c.topic for c, _, _ in raw_reader.messages()))
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    counts["metadata.yaml"] = {t["topic_metadata"]["name"]: t["message_count"]
                               for t in meta["topics_with_message_count"]}
    return counts


def retrain_read(bag: Path) -> dict[str, Any]:
    """``read_bag`` (what ``metarl retrain`` does with the bag): transitions or the error."""
    from metarl_ros.learning.bag_dataset import read_bag
    from metarl_ros.sim.env_config import load_env_setup

    setup = load_env_setup()
    try:
        data = read_bag(bag, setup, list(setup.robot.joint_names))
    except Exception as exc:  # noqa: BLE001 - reported, and fails the check
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "transitions": int(len(data.obs)), "dropped": dict(data.dropped)}


def recorder_log(text: str) -> dict[str, Any]:
    """What recorder_node logged closing the bag: messages written and lost per topic."""
    match = re.search(r"\[recorder_node\]: closed \S+: \d+ messages \(([^)]*)\)(.*)", text)
    if not match:
        return {}
    lost = re.search(r"sequence gaps: ([^)]*)\)", match.group(2))
    return {"written": _topic_counts(match.group(1)),
            "lost": _topic_counts(lost.group(1)) if lost else {}}


def _topic_counts(text: str) -> dict[str, int]:
    """``"/a 12, /b 3"`` -> ``{"/a": 12, "/b": 3}``."""
    return {t: int(n) for t, n in (part.rsplit(" ", 1) for part in text.split(", ") if part)}


def log_problems(text: str, limit: int = 12) -> dict[str, int]:
    """WARN/ERROR/FATAL lines without their time stamps, with how often each came."""
    lines = [re.sub(r"\[\d+\.\d+\] ", "", line) for line in text.splitlines()
             if re.match(r"\[(WARN|ERROR|FATAL)\]", line) or "failed" in line]
    return dict(Counter(lines).most_common(limit))


def check_bag(bag: Path, rates: dict[str, float], recorder: dict[str, Any]) -> dict[str, Any]:
    from metarl_ros.recording.bag import check_bag_folder

    result: dict[str, Any] = {"problems": []}
    problems = result["problems"]
    try:
        check_bag_folder(bag)
    except Exception as exc:  # noqa: BLE001
        problems.append(str(exc))
        return result | {"ok": False}
    storage = "mcap" if list(bag.glob("*.mcap")) else "sqlite3"
    result["storage"] = storage
    result["size_mb"] = sum(p.stat().st_size for p in bag.iterdir()) / 2**20
    result["topics"] = topics = time_checks(bag, storage, rates)
    result["counts"] = counts = reader_counts(bag)
    counts[f"{storage} file order ({'mcap' if storage == 'mcap' else 'rosbags'} reader)"] = {
        topic: entry["count_file_order"] for topic, entry in topics.items()}
    if recorder:
        counts["recorder_node log (written)"] = recorder["written"]
    else:
        problems.append("recorder_node logged no 'closed <bag>' line")
    if len({tuple(sorted(c.items())) for c in counts.values()}) != 1:
        problems.append("readers / metadata / recorder disagree on the counts")
    for topic, entry in topics.items():  # (commands: the controller's business, not the bag's)
        keys = ("log_time_backwards",) + (() if topic == COMMANDS else
                                          ("stamp_backwards", "repeats_after_t0"))
        problems += [f"{topic}: {key} {entry[key]}" for key in keys if entry.get(key)]
    result["tracking_error_rad"] = tracking_error(bag, storage)
    result["retrain_read"] = retrain_read(bag)
    if not result["retrain_read"]["ok"]:
        problems.append(f"read_bag: {result['retrain_read']['error']}")
    return result | {"ok": not problems}


# ---------------------------------------------------------------------------- summary


def expected_rates() -> dict[str, float]:
    """Hz per recorded topic, from the env and the shipped parameter files."""
    from metarl_ros.sim.env_config import load_env_setup

    control = load_env_setup().config.control_rate_hz
    params = yaml.safe_load((REPO / "config/adapter_node.yaml").read_text())
    adapter = params["adapter_node"]["ros__parameters"]
    return {"/joint_states": control, "/reference": control, COMMANDS: control,
            "/adapter_node/latent": adapter["context_rate_hz"],
            "/diagnostics": 1.0 + adapter["diagnostics_rate_hz"]}  # sim_node 1 Hz + adapter


def after_warmup(samples: list[dict], warmup_s: float) -> list[dict]:
    return [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]


def rss_summary(samples: list[dict], name: str, warmup_s: float) -> dict[str, float]:
    """RSS after the warm-up (start, end, max) and its growth: slope of a linear fit, MB/h."""
    window = after_warmup(samples, warmup_s)
    t = np.array([s["t_s"] for s in window])
    rss = np.array([s[f"rss_mb.{name}"] for s in window])
    cpu = np.array([s[f"cpu_s.{name}"] for s in window])
    fit = len(window) > 1 and np.isfinite(rss).all()
    return {"rss_start_mb": round(float(rss[0]), 1), "rss_end_mb": round(float(rss[-1]), 1),
            "rss_max_mb": round(max(s[f"rss_mb.{name}"] for s in samples), 1),
            "rss_growth_mb_per_h": round(float(np.polyfit(t / 3600, rss, 1)[0]), 2)
            if fit else None,
            "cpu_pct_of_core": round(float(100 * (cpu[-1] - cpu[0]) / (t[-1] - t[0])), 1)
            if fit else None}


def tick_summary(samples: list[dict], warmup_s: float) -> dict[str, Any]:
    """adapter_node's late ticks since its start and after the warm-up; last diagnostics."""
    first, end = after_warmup(samples, warmup_s)[0], samples[-1]
    ticks, late = end["adapter_node.ticks"], end["adapter_node.late_ticks"]
    window = ticks - first["adapter_node.ticks"]
    window_late = late - first["adapter_node.late_ticks"]
    return {"late_pct": round(100 * late / ticks, 2) if ticks else None,
            "ticks_after_warmup": window, "late_ticks_after_warmup": window_late,
            "late_pct_after_warmup": round(100 * window_late / window, 2) if window else None,
            **{k: v for k, v in end.items() if k.startswith(tuple(DIAG_KEYS))}}


def message_table(rates: dict[str, float], bag: dict[str, Any], recorder: dict[str, Any],
                  samples: list[dict], warmup_s: float) -> dict[str, dict]:
    """Per topic: expected at real time (rate x wall seconds the sim ran) and on the sim's
    clock (its instants, or rate x sim span; /diagnostics: rate x wall span), recorded,
    written / lost upstream as recorder_node logged, dropped (grid topics: sim instants
    missing, exact; others: expected - recorded, approximate) and the rate this script
    received after the warm-up."""
    topics = bag.get("topics", {})
    js = topics.get("/joint_states", {})
    sim_span, wall_span = js.get("sim_span_s", np.nan), js.get("wall_span_running_s", np.nan)
    window = after_warmup(samples, warmup_s)
    table = {}
    for topic, entry in topics.items():
        row: dict[str, Any] = {"recorded": entry["count_file_order"],
                               "recorder_written": recorder.get("written", {}).get(topic),
                               "lost_before_recorder": recorder.get("lost", {}).get(topic, 0)}
        if topic in rates:
            wall = entry["log_span_s"] if topic == "/diagnostics" else wall_span
            row["expected_rate_x_wall_s"] = int(rates[topic] * wall) + 1
        if topic in GRID_TOPICS:
            row.update(expected=entry["expected_on_grid"], t0_repeats=entry["t0_repeats"],
                       dropped=entry["missing_instants"])
        elif topic in rates:
            span = entry["log_span_s"] if topic == "/diagnostics" else sim_span
            row["expected"] = int(rates[topic] * span) + 1
            row["dropped_approx"] = max(0, row["expected"] - row["recorded"])
        key = f"received{topic}"
        if key in window[-1] and len(window) > 1:
            row["received_rate_hz"] = round((window[-1][key] - window[0][key])
                                            / (window[-1]["t_s"] - window[0]["t_s"]), 2)
        table[topic] = row
    return table


# ---------------------------------------------------------------------------- main


def wait_running(procs: dict[str, subprocess.Popen], mon: Monitor, timeout_s: float) -> bool:
    """Until the first command is seen (the controller answers the sim)."""
    deadline = time.monotonic() + timeout_s
    while not mon.counts[COMMANDS]:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
            return False
        time.sleep(0.1)
    return True


def soak(procs: dict[str, subprocess.Popen], mon: Monitor, args, samples: list[dict]) -> str:
    """Sample into ``samples`` until ``args.duration``; returns what went wrong ('')."""
    start, last_js = time.monotonic(), -1
    while True:
        t = time.monotonic() - start
        samples.append(sample := take_sample(t, procs, mon))
        dead = [name for name, p in procs.items() if p.poll() is not None]
        if dead:
            return f"exited early: {', '.join(dead)} at {t:.0f} s"
        if mon.counts["/joint_states"] == last_js:
            return f"stalled: no /joint_states for {args.sample_period:g} s at {t:.0f} s"
        last_js = mon.counts["/joint_states"]
        rss = "  ".join(f"{k[7:]} {v:.0f} MB" for k, v in sample.items() if k[:7] == "rss_mb.")
        print(f"[soak] t={t:5.0f} s  {rss}  ticks {sample['adapter_node.ticks']:.0f} late "
              f"{sample['adapter_node.late_ticks']:.0f}  sim RTF "
              f"{sample['sim_node.real_time_factor_achieved']:.2f}  load "
              f"{sample['load_1min']:.2f}", flush=True)
        if t >= args.duration:
            return ""
        time.sleep(min(args.sample_period, args.duration - t))


def print_summary(r: dict[str, Any]) -> None:
    print(f"[soak] {r['graph']}\n  {r['duration_s']:.0f} s after a {r['startup_s']:.0f} s "
          f"start-up; load average {r['load_average_start'][0]:.2f} -> "
          f"{r['load_average_end'][0]:.2f} ({r['cpu_count']} cores); exit codes "
          f"{r['exit_codes']}{'; ' + r['failure'] if r['failure'] else ''}")
    for name, m in r["memory"].items():
        print(f"  {name}: RSS {m['rss_start_mb']} -> {m['rss_end_mb']} MB (max "
              f"{m['rss_max_mb']}), growth {m['rss_growth_mb_per_h']} MB/h, CPU "
              f"{m['cpu_pct_of_core']} % of a core")
    t = r["ticks"]
    if t:
        print(f"  adapter_node: {t['adapter_node.ticks']:.0f} ticks, "
              f"{t['adapter_node.late_ticks']:.0f} late ({t['late_pct']} %; after the warm-up "
              f"{t['late_pct_after_warmup']} %), inference p50/p99 "
              f"{t['adapter_node.inference_latency_p50_ms']}/"
              f"{t['adapter_node.inference_latency_p99_ms']} ms; sim_node: real-time factor "
              f"{t['sim_node.real_time_factor_achieved']}, {t['sim_node.overruns']:.0f} overruns")
    print(f"  {'topic':28} {'exp.(wall)':>10} {'exp.(sim)':>9} {'recorded':>8} {'dropped':>7} "
          f"{'lost':>4} {'rate Hz':>7}")
    for topic, row in r["messages"].items():
        dropped = row.get("dropped", row.get("dropped_approx", "-"))
        print(f"  {topic:28} {row.get('expected_rate_x_wall_s', '-'):>10} "
              f"{row.get('expected', '-'):>9} {row['recorded']:>8} {dropped:>7} "
              f"{row['lost_before_recorder']:>4} {row.get('received_rate_hz', '-'):>7}")
    bag = r["bag"]
    print(f"  bag {bag.get('size_mb', 0):.1f} MB {bag.get('storage', '')}: "
          f"{'OK' if bag['ok'] else 'FAILED: ' + '; '.join(bag['problems'])}; read_bag: "
          f"{bag.get('retrain_read', {}).get('transitions', '-')} transitions; tracking "
          f"error |q_ref - q| (rad) {bag.get('tracking_error_rad')}")
    for line, n in r["log_problems"].items():
        print(f"  log x{n}: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="soak seconds")
    parser.add_argument("--sample-period", type=float, default=30.0, help="s between samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="s before RSS 'start'")
    parser.add_argument("--out", type=Path, help="bag, logs and JSON go here "
                        "(default runs/soak-<date-time>)")
    parser.add_argument("--json", type=Path, help="results (default <out>/soak.json)")
    parser.add_argument("--launch-arg", action="append", default=[], metavar="NAME:=VALUE",
                        help="another adapt_sim argument (repeatable), e.g. "
                             "reference_preview:=0.005 act_ahead:=true")
    parser.add_argument("--per-node", action="store_true",
                        help="one process per node (as ros2 launch) instead of metarl launch")
    args = parser.parse_args(argv)
    out = (args.out or REPO / "runs" / datetime.now().strftime("soak-%Y%m%d-%H%M%S")).resolve()
    bag = out / "bag"
    if bag.exists():
        parser.error(f"{bag} exists: pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(loopback_ros_env())
    rates, load_start = expected_rates(), os.getloadavg()
    mon = Monitor()
    launch_args = [*LAUNCH_ARGS, *args.launch_arg]
    procs = start_graph(bag, out, args.per_node, launch_args)
    started, startup_s = time.monotonic(), 0.0
    failure = "the graph did not start (no command within 300 s, or a process exited)"
    samples: list[dict] = []
    try:
        if wait_running(procs, mon, 300.0):
            startup_s = time.monotonic() - started
            print(f"[soak] running after {startup_s:.1f} s; pids "
                  f"{ {n: p.pid for n, p in procs.items()} }; logs in {out}", flush=True)
            failure = soak(procs, mon, args, samples)
    except KeyboardInterrupt:
        failure = "interrupted (Ctrl-C)"
    finally:  # whatever happened: stop the graph cleanly, then look at what it left
        load_end = os.getloadavg()
        exit_codes = stop_graph(procs)
        mon.close()
    text = "\n".join((out / f"{name}.log").read_text() for name in procs)
    recorder = recorder_log(text)
    try:
        bag_result = check_bag(bag, rates, recorder)
    except Exception as exc:  # noqa: BLE001 - a bag the readers choke on fails the check
        bag_result = {"ok": False, "problems": [f"reading failed: {type(exc).__name__}: {exc}"]}
    failed = bool(failure) or any(c != 0 for c in exit_codes.values()) or not bag_result["ok"]
    results = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None
                                                           else argv),
        "graph": "metarl launch adapt_sim " + " ".join([*launch_args, f"bag:={bag}"])
                 + (" (one process per node)" if args.per_node else ""),
        "passed": not failed, "failure": failure, "exit_codes": exit_codes,
        "duration_s": samples[-1]["t_s"] if samples else 0.0, "warmup_s": args.warmup,
        "startup_s": round(startup_s, 1),
        "ros_domain_id": os.environ["ROS_DOMAIN_ID"], "cpu_count": os.cpu_count(),
        "load_average_start": load_start, "load_average_end": load_end, "rates_hz": rates,
        "memory": {n: rss_summary(samples, n, args.warmup) for n in procs} if samples else {},
        "ticks": tick_summary(samples, args.warmup) if samples else {},
        "messages": message_table(rates, bag_result, recorder, samples, args.warmup)
        if samples else {},
        "bag": {"path": str(bag), **bag_result}, "log_problems": log_problems(text),
        "samples": samples,
    }
    print_summary(results)
    json_path = args.json or out / "soak.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"[soak] {'FAILED: ' + (failure or 'see above') if failed else 'passed'}; "
          f"results in {json_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
