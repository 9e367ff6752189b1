"""Where a node's joint-state callback spends its time at a control tick, part by part.

    .venv/bin/python benchmarks/tick_breakdown.py --node adapter   # pearl + MAML (process)
    .venv/bin/python benchmarks/tick_breakdown.py --node onnx [--no-parts]

Builds adapter_node (policy pearl, MAML on, ``models/pearl/model.pt``) or onnx_policy_node
(``models/pearl/onnx``) in this process, both with ``act_ahead`` true, and calls its
subscription callbacks directly, as the executor would, with what ``ros_latency.py`` sends: a
joint state every 2 ms of wall time (one in five is a 100 Hz control tick; as serialized
bytes, which is how the node subscribes to them) followed by the reference of the instant 5 ms
later (a preview). Nothing goes through DDS: the commands are published to no subscriber.
Each part of the tick is timed by a wrapper (a wrapper adds about a microsecond), so the
parts show what the callback's time is made of; their sum is not the callback's time.
``callback start to rclpy publish`` is the part of the callback the command waits for;
``--no-parts`` times only that and the whole callback, without the parts' wrappers. Prints
the p50 / p90 of each, in ms, after the first sixth of the ticks.

The parts on the command's path: ``on_joint_state`` (the loop's intake and timing; reading
the bytes comes before it), ``tick`` (safety checks, the prepared action, the MAML correction
if any, the efforts), within it ``policy`` (the action and its ``correction``, which includes
the measured ``tracking errors`` it reads), ``efforts`` (the PD law) and ``clamp``; then
``publish`` (the command's bytes and rclpy's publish). After the command: ``after_command``.
``observations (off the path)`` counts every whole observation built (the
reference view when a reference is prepared, the measured one after the command).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import time

import numpy as np
from loopback import loopback_ros_env  # benchmarks/loopback.py


def _timed(store: dict, label: str, owner, name: str) -> None:
    """Replace ``owner.name`` by a wrapper that appends each call's seconds to
    ``store[label]``."""
    call = getattr(owner, name)

    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            store[label].append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", choices=("adapter", "onnx"), default="adapter")
    parser.add_argument("--model", default="models/pearl/model.pt", help="adapter: model.pt")
    parser.add_argument("--onnx-model", default="models/pearl/onnx", help="onnx: export dir")
    parser.add_argument("--states", type=int, default=3000, help="joint states sent (2 ms apart)")
    parser.add_argument("--no-parts", action="store_true",
                        help="time the callback only, without the parts' wrappers")
    args = parser.parse_args()
    os.environ.update(loopback_ros_env())
    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.parameter import Parameter
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import JointState

    import metarl_ros.control.controller as controller
    import metarl_ros.control.measured as measured
    import metarl_ros.control.policy_calls as policy_calls

    rclpy.init()
    if args.node == "adapter":
        from metarl_ros.nodes.adapter_node import AdapterNode as NodeClass

        overrides = [Parameter("policy", value="pearl"), Parameter("model_path", value=args.model)]
    else:
        from metarl_ros.nodes.onnx_policy_node import OnnxPolicyNode as NodeClass

        overrides = [Parameter("model_path", value=args.onnx_model)]
    node = NodeClass(parameter_overrides=overrides + [Parameter("act_ahead", value=True)])
    try:
        process = getattr(node.policy, "process", None)
        if process is not None and not process.wait_ready(60.0):
            raise SystemExit("the MAML adaptation process did not start")
        times: dict[str, list[float]] = collections.defaultdict(list)
        loop = node.loop
        if not args.no_parts:
            _timed(times, "on_joint_state", loop, "on_joint_state")
            _timed(times, "tick", loop, "tick")
            _timed(times, "  policy", loop.calls, "act")
            _timed(times, "observations (off the path)", policy_calls, "build_observation")
            _timed(times, "observations (off the path)", measured, "build_observation")
            if loop.calls._correct is not None:  # noqa: SLF001 - the correction the loop calls
                _timed(times, "    correction", loop.calls, "_correct")
                _timed(times, "      tracking errors", measured.MeasuredObservation,
                       "tracking_errors")
            _timed(times, "  efforts", controller, "effort_command")
            _timed(times, "  clamp", loop.clamp, "clamp")
            _timed(times, "publish", node.commands, "publish")
            _timed(times, "after_command", loop, "after_command")
        to_publish: list[float] = []  # the callback's start to the command's publish
        publish = node.commands._publisher.publish  # noqa: SLF001 - rclpy's publish

        def timed_publish(msg):  # timed_publish.started: set per callback below
            to_publish.append(time.perf_counter() - timed_publish.started)
            publish(msg)

        node.commands._publisher.publish = timed_publish  # noqa: SLF001
        callback: list[float] = []

        names = list(node.setup.robot.joint_names)
        n = len(names)
        pose = np.asarray(node.setup.robot.default_pose, float)

        def message(stamp_ns: int, position: np.ndarray) -> JointState:
            msg = JointState(name=names, position=position.tolist(), velocity=[0.0] * n,
                             effort=[0.0] * n)
            msg.header.stamp = Time(sec=stamp_ns // 1_000_000_000,
                                    nanosec=stamp_ns % 1_000_000_000)
            return msg

        period_ns = 2_000_000
        first = (time.time_ns() // 10_000_000 + 1) * 10_000_000  # on the 100 Hz grid
        gc.freeze()  # as the nodes do once started (metarl_ros.nodes.common.freeze_heap)
        for seq in range(args.states):
            instant = first + seq * period_ns
            while (left := instant - time.time_ns()) > 0:
                time.sleep(max(0.0, left / 1e9 - 2e-4))
            position = pose.copy()
            position[0] -= seq * 1e-6
            state, reference = message(instant, position), message(instant + 5_000_000, pose)
            raw = serialize_message(state)
            start = timed_publish.started = time.perf_counter()
            node._on_joint_state(raw)  # noqa: SLF001 - the subscription's callback
            if seq % 5 == 0:
                callback.append(time.perf_counter() - start)
            node._on_reference(reference)  # noqa: SLF001
        stats = loop.stats
        print(f"{args.node}: {stats.policy_ticks} policy ticks, {stats.safe_ticks} safe; "
              "p50 / p90 ms")
        order = ["on_joint_state", "tick", "  policy", "    correction",
                 "      tracking errors", "  efforts", "  clamp", "publish", "after_command",
                 "observations (off the path)"]
        rows = [("callback at a tick (all of it)", callback),
                ("callback start to rclpy publish", to_publish)]
        rows += [(label, times[label]) for label in order if times.get(label)]
        for label, values in rows:
            v = np.asarray(values[len(values) // 6:]) * 1e3
            print(f"  {label:32s} {np.percentile(v, 50):7.3f} / {np.percentile(v, 90):7.3f}"
                  f"   ({v.size} calls)")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
