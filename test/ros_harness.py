"""Helpers for tests that run real rclpy nodes over DDS (loopback, a domain of their own)."""

from __future__ import annotations

import gc
import os
import threading
import time
import traceback
from typing import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from metarl_ros.nodes.common import freeze_heap

try:  # the exception rclpy raises for a handle whose destruction was requested
    from rclpy._rclpy_pybind11 import InvalidHandle
except ImportError:  # pragma: no cover - other rclpy layouts
    from rclpy.exceptions import InvalidHandle  # type: ignore[no-redef]


def domain_id(offset: int, probe_s: float = 0.3, tries: int = 6) -> int:
    """A ROS domain for this process and test module (``offset`` per module).

    Domains come from ``METARL_TEST_DOMAINS`` (``"first-last"``, e.g. ``11-20``, for
    machines where several people run tests at once), else from 1..101. The first candidate is
    ``(pid + offset)`` mapped into that range; domains where other ROS nodes are already seen
    (other test runs, benchmarks, demos on this machine) are skipped, so concurrent runs do
    not cross-talk; gives up probing after ``tries`` domains.
    """
    low, high = _domain_range()
    size = high - low + 1
    first = (os.getpid() + offset) % size
    for step in range(min(tries, size)):
        candidate = low + (first + 7 * step) % size
        if not _domain_busy(candidate, probe_s):
            return candidate
    return low + first


def _domain_range() -> tuple[int, int]:
    spec = os.environ.get("METARL_TEST_DOMAINS", "").strip()
    if not spec:
        return 1, 101
    try:
        low, high = (int(part) for part in spec.split("-"))
    except ValueError:
        raise ValueError(f"METARL_TEST_DOMAINS={spec!r}: expected 'first-last', e.g. 11-20")
    if not 0 <= low <= high <= 232:
        raise ValueError(f"METARL_TEST_DOMAINS={spec!r}: need 0 <= first <= last <= 232")
    return low, high


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
    """An rclpy context on its own domain, spun by one executor thread, as nodes run in a
    product process (``run_node``, ``metarl launch``).

    * SingleThreadedExecutor, as the product's executables use: every lockstep period
      crosses fewer threads (and GIL hand-overs) than with rclpy's MultiThreadedExecutor,
      whose tail latency under CPU load was several times higher (docs/ROS_NODES.md).
    * Nodes are destroyed only between two executor iterations (``_lock``): destroying one
      while the executor builds its wait set raised ``InvalidHandle`` inside rclpy and ended
      the spin thread, after which nothing in the session was delivered any more.
    * The heap is frozen (:func:`~metarl_ros.nodes.common.freeze_heap`) after a node is
      added, as ``run_node`` does after start-up: the garbage collector's full passes then
      skip what the test process has loaded (torch, onnxruntime, the test modules) and stay
      short, instead of stopping every node thread for hundreds of milliseconds.
    * An exception from a callback does not stop the session; it is kept and raised by the
      next :meth:`remove_all` or :meth:`close`, so the test that caused it fails.
    """

    def __init__(self, domain: int) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._nodes: list[Node] = []
        self._thread = threading.Thread(target=self._spin, name="ros_session", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            with self._lock:
                try:
                    self.executor.spin_once(timeout_sec=0.05)
                except InvalidHandle:
                    continue  # an entity of a node removed since the last wait: skip it
                except ExternalShutdownException:
                    return
                except Exception:  # noqa: BLE001 - kept for the test, the session goes on
                    self.errors.append(traceback.format_exc())

    def add(self, node: Node) -> Node:
        self._nodes.append(node)
        self.executor.add_node(node)
        freeze_heap(collect=False)
        return node

    def remove(self, node: Node) -> None:
        self.executor.remove_node(node)  # also wakes the executor
        with self._lock:
            self._nodes.remove(node)
            node.destroy_node()

    def remove_all(self) -> None:
        for node in list(self._nodes):
            self.remove(node)
        self.raise_errors()

    def raise_errors(self) -> None:
        """Raise if a callback failed since the last call (with its traceback)."""
        errors, self.errors = self.errors, []
        if errors:
            raise RuntimeError("a callback raised in the ROS session:\n" + "\n".join(errors))

    def close(self) -> None:
        try:
            self.remove_all()
        finally:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self.executor.shutdown(timeout_sec=2.0)
            rclpy.try_shutdown(context=self.context)
            gc.unfreeze()  # what the session's nodes left behind can be collected again
            gc.collect()


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
