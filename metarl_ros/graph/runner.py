"""Run a node graph description in this process, without ``ros2 launch``.

Each node of a :mod:`metarl_ros.graph.spec` graph starts with its parameter files and
overrides (exactly what ``launch/<graph>.launch.py`` hands to ``ros2 launch``) on one executor
(single-threaded by default: the simulation loop has its own thread, and rclpy's
MultiThreadedExecutor costs more CPU than it saves here). ``metarl launch``
(:mod:`metarl_ros.cli.launch`) and ``metarl demo`` use it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from metarl_ros.graph.spec import Graph, NodeSpec, parameter_file_path


def node_arguments(spec: NodeSpec) -> tuple[list[str], list]:
    """``(cli_args, parameter_overrides)`` that give an in-process node what launch gives it."""
    from rclpy.parameter import Parameter

    cli_args = ["--ros-args"]
    for path in spec.parameter_files:
        cli_args += ["--params-file", parameter_file_path(path)]
    for source, target in spec.remappings:
        cli_args += ["-r", f"{source}:={target}"]
    overrides = [Parameter(name, value=value) for name, value in spec.parameters.items()]
    return cli_args, overrides


def _create_node(spec: NodeSpec, context, extra: dict | None = None):
    module = importlib.import_module(spec.module)
    cls = getattr(module, spec.node_class)
    cli_args, overrides = node_arguments(spec)
    if extra:
        from rclpy.parameter import Parameter

        overrides += [Parameter(name, value=value) for name, value in extra.items()]
    return cls(node_name=spec.name, context=context, cli_args=cli_args,
               parameter_overrides=overrides)


class _Stop:
    """First SIGINT/SIGTERM asks to stop; later ones during shutdown are ignored."""

    def __init__(self, prefix: str) -> None:
        self.event = threading.Event()
        self.prefix = prefix
        self.signals = 0

    def __call__(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"[{self.prefix}] {signal.Signals(signum).name}: shutting down", flush=True)
        else:
            print(f"[{self.prefix}] already shutting down", flush=True)
        self.event.set()


@contextlib.contextmanager
def stop_on_signals(prefix: str = "metarl launch") -> Iterator[threading.Event]:
    """Within: SIGINT/SIGTERM set the yielded event (a second one is ignored). On leaving,
    both signals are ignored: the process is about to exit, and Python resets custom handlers
    to SIG_DFL during teardown (not SIG_IGN), so a late Ctrl-C would otherwise kill it with
    -2 after a clean run."""
    stopper = _Stop(prefix)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopper)
    try:
        yield stopper.event
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class GraphReport:
    """How a run of a graph ended: exit code and each graph node's counters."""

    code: int
    """0: stopped as asked (duration reached, stop event); 1: a required node failed or the
    executor did."""
    nodes: dict[str, dict[str, Any]]
    """node name -> counters (:func:`node_counters`); nodes without counters are left out."""


def run_graph(graph: Graph, duration_s: float | None = None, threads: int = 1,
              stop: threading.Event | None = None, *,
              companions: Sequence[Callable[[Any], Any]] = (),
              log_level: str | None = None) -> GraphReport:
    """Start ``graph``'s nodes, spin until ``duration_s`` simulated seconds or ``stop``.

    Args:
        graph: the nodes to start (:mod:`metarl_ros.graph.spec`).
        duration_s: simulated seconds (sim_node's ``duration_s``); wall seconds for a graph
            without sim_node; None = until ``stop``.
        threads: executor threads (1 = SingleThreadedExecutor).
        stop: set it to stop the run (signal handlers do).
        companions: factories ``f(context) -> Node`` of extra nodes that are not part of the
            graph (e.g. a monitor), created in the same context *before* the graph's nodes,
            so they are subscribed before the simulation steps, and spun on the same executor.
            The caller keeps its own references to read them after the run.
        log_level: rcl logger level for every node (``debug``/``info``/``warn``/...);
            None = ROS's default (info).
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from metarl_ros.nodes.common import freeze_heap

    stop = stop or threading.Event()
    stopping = threading.Event()  # set once shutdown starts: later executor errors are noise
    context = Context()
    # Our own SIGINT handling: rclpy's would shut the context down under the executor.
    # args: not sys.argv, whose name:=value launch arguments rcl would take for remap rules.
    init_args = ["metarl-launch"]
    if log_level:
        init_args += ["--ros-args", "--log-level", log_level]
    rclpy.init(args=init_args, context=context, signal_handler_options=SignalHandlerOptions.NO)
    nodes = []
    extra_nodes = []
    executor = None
    spin_thread = None
    code = 0
    counters: dict[str, dict[str, Any]] = {}
    try:
        extra_nodes = [factory(context) for factory in companions]
        for spec in graph.nodes:
            extra = None
            if spec.name == "sim_node" and duration_s is not None:
                extra = {"duration_s": float(duration_s)}
            nodes.append(_create_node(spec, context, extra))
        for note in graph.notes:
            nodes[0].get_logger().warning(note)
        # as run_node does: full GC passes over the start-up heap (torch, the model) stall
        # every thread for 0.1 s and more (lockstep timeouts); undone at the end of the run
        freeze_heap()
        executor = (MultiThreadedExecutor(num_threads=threads, context=context) if threads > 1
                    else SingleThreadedExecutor(context=context))
        for node in [*extra_nodes, *nodes]:
            executor.add_node(node)
        spin_thread = threading.Thread(target=_spin, args=(executor, stopping), name="executor",
                                       daemon=True)
        spin_thread.start()
        sim = next((n for n, spec in zip(nodes, graph.nodes) if spec.name == "sim_node"), None)
        wall_end = (time.monotonic() + duration_s if sim is None and duration_s is not None
                    else None)
        while not stop.is_set():
            failed = failed_nodes(nodes, graph.nodes)
            if failed:
                for name, why in failed:
                    print(f"[metarl launch] required node {name} failed: {why}; ending the "
                          "graph", file=sys.stderr, flush=True)
                code = 1
                break
            if sim is not None and sim.finished.is_set():
                break
            if wall_end is not None and time.monotonic() >= wall_end:
                break
            if not spin_thread.is_alive():
                code = 1
                break
            stop.wait(0.05)
        for node, spec in zip(nodes, graph.nodes):
            try:
                values = node_counters(node)
            except Exception:  # noqa: BLE001 - a failed node's context may be gone already
                values = None
            if values is not None:
                counters[spec.name] = values
    finally:
        stopping.set()
        if executor is not None:
            executor.shutdown(timeout_sec=2.0)
        if spin_thread is not None:
            spin_thread.join(timeout=5.0)
        for node in [*nodes, *extra_nodes]:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        gc.unfreeze()  # what this run froze can be collected once its nodes are gone
    return GraphReport(code, counters)


def failed_nodes(nodes: Sequence[Any], specs: Sequence[NodeSpec]) -> list[tuple[str, str]]:
    """``(name, why)`` of each required node that has failed while running: its ``failure``
    attribute is set (sim_node's simulation thread sets it when it crashes)."""
    return [(spec.name, str(node.failure)) for node, spec in zip(nodes, specs)
            if spec.required and getattr(node, "failure", None)]


def _spin(executor, stopping: threading.Event) -> None:
    """Spin until shutdown; a failure while running is reported, one while stopping is not."""
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except ExternalShutdownException:
        return  # a node shut the context down (a failed node: the run loop reports it)
    except Exception as exc:  # noqa: BLE001
        if not stopping.is_set():
            print(f"[metarl launch] executor failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            raise


#: adapter_node / onnx_policy_node counters reported at the end of a run (from /diagnostics).
CONTROLLER_COUNTERS = ("ticks", "safe_ticks", "policy_errors", "late_tick_pct",
                       "inference_latency_p50_ms", "inference_latency_p99_ms",
                       "adaptation_events")
#: controller parameters reported with them (what the node really ran with).
CONTROLLER_PARAMETERS = ("policy", "adaptation", "maml", "parameter_adaptation",
                         "adaptation_schedule",
                         "posterior_update")


def node_counters(node) -> dict[str, Any] | None:
    """End-of-run counters of sim_node or a controller node (None for other nodes)."""
    if hasattr(node, "sim"):
        return {"sim_time_s": round(node.sim.time_s, 6),
                "real_time_factor": round(node.achieved_real_time_factor(), 3),
                "commands": node.commands_received,
                "commands_rejected": node.commands_rejected,
                "lockstep_timeouts": node.lockstep_timeouts,
                "tracking_rms_mrad": round(node.tracking_rms_mrad(), 3)}
    if hasattr(node, "loop"):
        values = node.loop.diagnostics(0.0).values
        counters = {key: _number(values[key]) for key in CONTROLLER_COUNTERS}
        for name in CONTROLLER_PARAMETERS:  # as the running node has them
            if node.has_parameter(name):
                counters[name] = node.get_parameter(name).value
        # torch PEARL policy: MAML adaptation steps done (0 with adaptation off)
        policy = getattr(node.loop, "policy", None)
        if hasattr(policy, "adaptation"):
            counters["maml_adaptations"] = int(getattr(policy.adaptation, "steps", 0))
        return counters
    return None


def _number(value: Any) -> Any:
    """Diagnostics values are strings for DiagnosticStatus; numbers come back as numbers."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value
