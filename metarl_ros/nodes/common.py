"""Helpers shared by the nodes: QoS profiles, time conversion, parameters, ``main``."""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.executors import (
    ExternalShutdownException,
    MultiThreadedExecutor,
    SingleThreadedExecutor,
)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

#: Commands, as ros2_control's command subscribers expect them (RELIABLE).
COMMAND_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
#: Joint states, references, clock, latents, diagnostics.
STATE_QOS = COMMAND_QOS
#: Sensor data as many drivers publish it (BEST_EFFORT, depth 5).
BEST_EFFORT_QOS = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.BEST_EFFORT,
                             durability=DurabilityPolicy.VOLATILE)
#: Slow-changing state late joiners must see (the true task): last value is kept.
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


def stamp_to_s(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def now_s(node: Node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


def declare(node: Node, name: str, default: Any, description: str, *,
            low: float | None = None, high: float | None = None,
            choices: Sequence[str] | None = None,
            param_type: Parameter.Type | None = None) -> Any:
    """Declare a parameter with a descriptor (and range); return its value.

    ``default=None`` with ``param_type`` declares a typed parameter without value (``None``
    if not given), e.g. an optional ``DOUBLE_ARRAY``. ``choices`` is enforced here (ROS has
    no descriptor field for it) and listed in the description.
    """
    if choices:
        description = f"{description} One of: {', '.join(choices)}."
    descriptor = ParameterDescriptor(name=name, description=description)
    if low is not None and high is not None:
        if isinstance(default, int) and not isinstance(default, bool):
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high),
                                                     step=0)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(low), to_value=float(high), step=0.0)]
    value = node.declare_parameter(name, default if default is not None else param_type,
                                   descriptor).value
    if choices and value not in choices:
        raise ValueError(f"parameter {name}={value!r}: must be one of {', '.join(choices)}")
    declared = node.__dict__.setdefault("_metarl_parameters", {})
    declared[name] = tuple(choices or ())
    return value


def guard_parameters(node: Node, live: dict[str, Callable[[Any], None]]) -> None:
    """Make ``ros2 param set`` tell the truth about the parameters :func:`declare` declared.

    Parameters named in ``live`` are applied at once by calling ``live[name](value)``, after
    their choices (if any) are checked; every other declared parameter is read at start-up
    only, so setting it is refused with that reason (rather than succeeding while nothing
    changes). ROS's own parameters (``use_sim_time``, QoS overrides...) are left alone. Call
    after the last :func:`declare`.
    """
    declared: dict[str, tuple[str, ...]] = node.__dict__.get("_metarl_parameters", {})

    def on_set(parameters: list[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            name, value = parameter.name, parameter.value
            if name not in declared:
                continue
            if name not in live:
                return SetParametersResult(
                    successful=False,
                    reason=f"{name} is read-only: it is read at start-up only; restart the "
                           "node with the new value")
            choices = declared[name]
            if choices and value not in choices:
                return SetParametersResult(
                    successful=False,
                    reason=f"{name}={value!r}: must be one of {', '.join(choices)}")
        for parameter in parameters:
            if parameter.name in declared:
                try:
                    live[parameter.name](parameter.value)
                except ValueError as exc:
                    return SetParametersResult(successful=False, reason=f"{parameter.name}: {exc}")
                node.get_logger().info(f"parameter {parameter.name} set to {parameter.value!r}")
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)


def freeze_heap(collect: bool = True) -> int:
    """Take every object alive now out of the garbage collector's reach (``gc.freeze``).

    Call once a node has started: what start-up made (imported modules, torch's or
    onnxruntime's state, the model) lives as long as the process, yet CPython's full
    collections walk all of it, stopping every thread of the process meanwhile (with torch
    loaded, a tenth of a second and more: docs/ROS_NODES.md). After freezing, full passes
    only walk what the running loop allocated. ``collect`` first collects,
    so garbage left from start-up is freed rather than kept forever. Returns how many objects
    are frozen.
    """
    if collect:
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


#: Executors a node can spin on (its ``executor`` parameter).
EXECUTOR_KINDS = ("single", "events")


def make_executor(kind: str = "single", num_threads: int = 1):
    """The executor a node executable spins on.

    ``single``: rclpy's SingleThreadedExecutor, or its MultiThreadedExecutor when
    ``num_threads`` > 1 (callback groups run in parallel; measured here it tripled
    adapter_node's sensor-to-command latency, docs/BENCHMARKS.md). ``events``: rclpy's
    EventsExecutor (``rclpy.experimental``, rclpy 9 = Kilted and later), which dispatches from
    C++ instead of rebuilding a wait set in Python every wake-up; one thread only.

    Raises:
        ValueError: an unknown ``kind``, ``events`` with ``num_threads`` > 1, or ``events``
            on an rclpy without it (Humble, Jazzy).
    """
    if kind not in EXECUTOR_KINDS:
        raise ValueError(f"executor {kind!r}: must be one of {', '.join(EXECUTOR_KINDS)}")
    if kind == "single":
        return (MultiThreadedExecutor(num_threads=num_threads) if num_threads > 1
                else SingleThreadedExecutor())
    if num_threads > 1:
        raise ValueError(f"executor 'events' runs one thread; executor_threads={num_threads} "
                         "needs executor 'single'")
    try:
        from rclpy.experimental import EventsExecutor
    except ImportError as exc:
        raise ValueError("executor 'events' needs rclpy's EventsExecutor (rclpy 9, ROS 2 "
                         "Kilted and later); this rclpy has none: use executor 'single'") from exc
    return EventsExecutor()


def spin(executor) -> None:
    """Spin until the context shuts down (raises what the executor raises).

    The EventsExecutor's ``spin()`` does not return when SIGINT or SIGTERM shuts the context
    down (rclpy 9.1: the process had to be killed), so it is spun in bounded waits that
    look at the context between them; any other executor spins as usual.
    """
    if isinstance(executor, rclpy.executors.Executor):
        executor.spin()
        return
    while rclpy.ok():
        executor.spin_once(timeout_sec=0.1)


#: How long a node executable's teardown (executor shutdown, node destruction, rclpy
#: shutdown) may take before it counts as hung. Below ``ros2 launch``'s 5 s before it escalates
#: to SIGTERM and then SIGKILL, so a hung node says where it hung before it is killed silently.
TEARDOWN_TIMEOUT_S = 4.0


def run_node(factory: Callable[[], Node], args: list[str] | None = None,
             num_threads: int = 1, teardown_timeout_s: float | None = TEARDOWN_TIMEOUT_S) -> int:
    """``main`` body of a node executable: init, spin, portable clean shutdown.

    The executor comes from :func:`make_executor`: a node's ``executor`` and
    ``executor_threads`` parameters, if it declares them, override ``"single"`` and
    ``num_threads``.

    Once the node is constructed, the start-up heap is frozen (:func:`freeze_heap`) so that
    garbage collection does not stall the control loop.

    SIGINT and SIGTERM stop the node between callbacks, never inside one: while it spins,
    rclpy's signal handler shuts the context down and the spin returns (a
    ``KeyboardInterrupt`` raised at an arbitrary bytecode would land inside the control tick
    or inside rclpy's executor, whose state it can leave half-updated: seen as errors from a
    half-built ``Task``, and the likely cause of a rare hang at shutdown). Before the spin
    (start-up: loading, exporting) either signal interrupts at once, and the process exits 0.
    Once shutting down, SIGINT is ignored for the rest of the process, so an interrupted
    launch exits cleanly (0).
    A node that failed while running (its ``failure`` attribute set, e.g. sim_node's
    simulation thread; it has logged why and shut the context down) exits 1, so that
    ``ros2 launch`` sees it die.

    Teardown shuts the executor down first (it lets go of the node's entities), then destroys
    the node and shuts rclpy down. It is bounded: if it takes longer than
    ``teardown_timeout_s`` (``None``: no bound), faulthandler prints every thread's stack
    ("Timeout (0:00:04)!" and the stacks) and the process exits 1 -- a hang in teardown is
    never silent, and never waits for a SIGKILL.
    """
    signals = _watch_signals()
    rclpy.init(args=args)  # rclpy's handlers chain to ours
    node = None
    executor = None
    code = 0
    try:
        node = factory()
        if node.has_parameter("executor_threads"):
            num_threads = int(node.get_parameter("executor_threads").value)
        kind = (node.get_parameter("executor").value if node.has_parameter("executor")
                else "single")
        executor = make_executor(kind, num_threads)
        executor.add_node(node)
        freeze_heap()
        signals.spinning = True  # from here on a signal only shuts the context down
        spin(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:
        if signals.received or (node is not None and not rclpy.ok()):
            # Asked to stop: rclpy's handler shut the context down under the start-up (seen:
            # "Failed to create publisher: rcl node's context is invalid") or the wait raised
            # oddly ("Unable to convert call argument '0' to Python object"). Still clean.
            pass
        else:  # start-up errors (bad config) or a crash: one readable line, exit 1
            message = f"{type(exc).__name__}: {exc}"
            if node is not None:
                node.get_logger().fatal(message)
            else:
                print(f"[FATAL] {message}", flush=True)
            code = 1
    finally:
        # From here on SIGINT is ignored for good: a second Ctrl-C (the terminal's plus the one
        # ros2 launch forwards) must not interrupt the cleanup, nor the interpreter's own
        # teardown after main returns (Python resets custom handlers to SIG_DFL then, but
        # leaves SIG_IGN alone), which would turn a clean exit into "exit code -2".
        _ignore_sigint_for_good()
        with _bounded(teardown_timeout_s):
            if executor is not None:
                executor.shutdown(timeout_sec=teardown_timeout_s)
            if node is not None:
                if getattr(node, "failure", None):
                    code = 1
                node.destroy_node()
            rclpy.try_shutdown()
    return code


@contextlib.contextmanager
def _bounded(timeout_s: float | None) -> Iterator[None]:
    """Within: if the block takes longer than ``timeout_s``, print every thread's stack and
    exit 1. faulthandler's watchdog is a C thread, so it fires even when the block hangs
    holding the GIL (a deadlock in rclpy's C++ teardown)."""
    if timeout_s is None:
        yield
        return
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class _Signals:
    """What :func:`run_node`'s signal handlers saw, and whether the node spins yet."""

    def __init__(self) -> None:
        self.received = False
        self.spinning = False


def _watch_signals() -> _Signals:
    """Python-level SIGINT/SIGTERM handlers that record the signal (rclpy's handlers, installed
    after them, chain to them).

    Before the spin the first SIGINT or SIGTERM raises ``KeyboardInterrupt`` (start-up is
    abandoned); while spinning nothing is raised: rclpy's own handler has shut the context
    down, and the spin returns between callbacks. Later signals do nothing (SIGINT until
    :func:`_ignore_sigint_for_good` ignores it for good).
    """
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        return signals

    def on_signal(signum, frame):
        if signals.received:  # a second one (ros2 launch forwards, the terminal sends)
            return  # must not interrupt the cleanup the first one started
        signals.received = True
        if not signals.spinning:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return signals


def _ignore_sigint_for_good() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
