"""Helpers for tests that run real rclpy nodes over DDS (loopback, a domain of their own)."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter


def domain_id(offset: int, probe_s: float = 0.3, tries: int = 6) -> int:
    """A ROS domain in 1..101 for this process and test module (``offset`` per module).

    Starts from ``(pid + offset) % 101 + 1`` and skips domains where other ROS nodes are
    already seen (other test runs, benchmarks, demos on this machine), so concurrent runs
    do not cross-talk; gives up probing after ``tries`` domains.
    """
    first = (os.getpid() + offset) % 101
    for step in range(tries):
        candidate = (first + 7 * step) % 101 + 1
        if not _domain_busy(candidate, probe_s):
            return candidate
    return first + 1


def _domain_busy(domain: int, probe_s: float) -> bool:
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        node = Node("domain_probe", context=context)
        try:
            deadline = time.monotonic() + probe_s
            while time.monotonic() < deadline:
                if [n for n in node.get_node_names() if n != "domain_probe"]:
                    return True
                time.sleep(0.05)
            return False
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


class RosSession:
    """An rclpy context on its own domain, with a MultiThreadedExecutor spinning in a thread."""

    def __init__(self, domain: int, threads: int = 2) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        self._nodes: list[Node] = []

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # shutdown races
            pass

    def add(self, node: Node) -> Node:
        self._nodes.append(node)
        self.executor.add_node(node)
        return node

    def remove(self, node: Node) -> None:
        self.executor.remove_node(node)
        self._nodes.remove(node)
        node.destroy_node()

    def remove_all(self) -> None:
        for node in list(self._nodes):
            self.remove(node)

    def close(self) -> None:
        self.remove_all()
        self.executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5.0)


def params(**values) -> list[Parameter]:
    return [Parameter(name, value=value) for name, value in values.items()]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Collector:
    """Thread-safe list of received messages for one subscription."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list = []

    def __call__(self, msg) -> None:
        with self.lock:
            self.items.append(msg)

    def snapshot(self) -> list:
        with self.lock:
            return list(self.items)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


# Quarantine: lockstep DDS tests that time out intermittently on this machine (root cause open,
# docs/ROS_NODES.md "Known issue"). Skipped unless METARL_RUN_QUARANTINED=1.
QUARANTINED = pytest.mark.skipif(
    os.environ.get("METARL_RUN_QUARANTINED") != "1",
    reason="quarantined: intermittent DDS lockstep timeouts, root cause open "
    "(docs/ROS_NODES.md); run with METARL_RUN_QUARANTINED=1",
)
