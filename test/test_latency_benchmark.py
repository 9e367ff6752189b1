"""The latency benchmark's own arithmetic (benchmarks/ros_latency.py): how a command's latency is
split into legs, and which echo each node's p99 is compared with. The figures in
docs/BENCHMARKS.md rest on these; the measurement itself needs ROS and is not run here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ros_latency():
    sys.path.insert(0, str(BENCHMARKS))  # it imports its sibling loopback.py
    try:
        spec = importlib.util.spec_from_file_location("ros_latency", BENCHMARKS / "ros_latency.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_legs_match_each_command_to_the_callback_that_published_it(ros_latency):
    # joint states sent every 2 ms; the node answers the 1st and 3rd; the 2nd's callback
    # published nothing the driver received; a 4th command came from no traced callback
    answered = np.array([[0.000, 0.0006], [0.004, 0.0047], [0.006, 0.0069]])
    trace = np.array([[0.0002, 0.0003],    # callback of state 1, published at 0.3 ms
                      [0.0021, 0.0022],    # state 2's: no command of it was answered
                      [0.0041, 0.0045]])   # state 3's
    legs = ros_latency.legs_ms(answered, trace)
    np.testing.assert_allclose(legs, [[0.2, 0.1, 0.3], [0.1, 0.4, 0.2]], atol=1e-9)
    # the legs add up to the latency of the commands they split
    np.testing.assert_allclose(legs.sum(axis=1), [0.6, 0.7], atol=1e-9)


def test_legs_leave_out_a_command_whose_callback_started_before_its_state(ros_latency):
    # the only callback before the receipt started before the state was sent: not its callback
    legs = ros_latency.legs_ms(np.array([[0.010, 0.0105]]), np.array([[0.008, 0.0081]]))
    assert legs.shape == (0, 3)


def _round(**p99s: float) -> dict:
    """A round whose nodes' latencies (ms) have the given p99 (100 equal values)."""
    return {name: {"latencies_ms": np.full(100, p99)} for name, p99 in p99s.items()}


def test_nodes_are_compared_with_every_echo_measured_but_echoes_with_none(ros_latency):
    rounds = [_round(echo=0.5, echo_tick=0.8, adapter=1.0),
              _round(echo=0.6, echo_tick=0.9, adapter=0.9)]
    pooled = ros_latency.pool_rounds(rounds)
    adapter = pooled["adapter"]
    assert adapter["p99_x_echo_per_round"] == pytest.approx([2.0, 1.5])
    assert adapter["p99_x_echo_tick_per_round"] == pytest.approx([1.25, 1.0])
    assert adapter["p99_above_echo_tick_ms"] == pytest.approx(1.0 - 0.9)
    assert not any(key.startswith("p99_x") for key in pooled["echo_tick"])
    assert "p99_x_echo_events_tick" not in adapter  # not measured
