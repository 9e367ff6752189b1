"""adapter_node with the trained PEARL model through the default fault scenario (lockstep).

Needs ``models/pearl/model.pt`` (or ``METARL_PEARL_MODEL``) and torch; skipped with the reason
otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from ros_harness import Collector, RosSession, domain_id, params, wait_for
from std_msgs.msg import Float64MultiArray
from test_ros_nodes import TrackingMonitor

from metarl_ros.core.resources import resolve_path
from metarl_ros.graph.spec import adapt_sim_graph
from metarl_ros.nodes.adapter_node import AdapterNode
from metarl_ros.nodes.common import STATE_QOS
from metarl_ros.nodes.sim_node import SimNode
from metarl_ros.sim.env_config import load_env_setup
from metarl_ros.sim.scenario import load_scenario

# METARL_PEARL_MODEL points the test at another model file (e.g. a training run's).
MODEL = os.environ.get("METARL_PEARL_MODEL", adapt_sim_graph().arguments["model"])
SCENARIO = "config/scenarios/default.yaml"
RUN_S = 10.0  # the whole scenario: payload pick-up at 3 s, motor damage at 7 s


def _model_or_skip():
    path = resolve_path(MODEL)
    if not path.exists():
        reason = f"no trained PEARL model at {MODEL} yet (train it, or ship it in models/)"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed")
    return path


@pytest.fixture(scope="module")
def ros():
    _model_or_skip()
    session = RosSession(domain_id(offset=57))
    yield session
    session.close()


def _run(ros, adaptation: bool):
    """One lockstep run of the default scenario; returns (monitor, latents, adapter stats)."""
    probe = ros.add(ros_node("probe_pearl", ros))
    monitor = TrackingMonitor(probe)
    latents = Collector()
    stamps: list[float] = []

    def on_latent(msg):
        latents(msg)
        stamps.append(adapter.get_clock().now().nanoseconds * 1e-9)

    probe.create_subscription(Float64MultiArray, "/adapter_node/latent", on_latent, STATE_QOS)
    adapter = ros.add(AdapterNode(context=ros.context, parameter_overrides=params(
        use_sim_time=True, policy="pearl", model_path=str(resolve_path(MODEL)),
        adaptation=adaptation, adaptation_schedule="inline")))
    sim = ros.add(SimNode(context=ros.context, parameter_overrides=params(
        real_time_factor=0.0, scenario=SCENARIO, duration_s=RUN_S)))
    assert wait_for(sim.finished.is_set, 120.0), f"sim stuck at t={sim.sim.time_s}"
    assert sim.lockstep_timeouts == 0  # every period answered: no zero-effort steps
    stats = adapter.loop.stats
    result = (monitor, [np.array(m.data) for m in latents.snapshot()], list(stamps), stats)
    ros.remove_all()
    return result


def ros_node(name, ros):
    from rclpy.node import Node

    return Node(name, context=ros.context)


def _window_mean(monitor, start, end):
    errors = monitor.errors(start, end)
    assert len(errors) > 0.8 * (end - start) * 100
    return float(errors.mean())


def test_pearl_adapter_closes_the_loop_with_and_without_adaptation(ros):
    """The shipped PEARL model drives the sim through the payload and the motor damage,
    latent published; with adaptation:=false the latent stays at the prior and tracking stays
    bounded too, and after the motor damage the arm tracks better with adaptation than
    without.
    """
    setup = load_env_setup()
    scenario = load_scenario(resolve_path(SCENARIO), setup.robot.joint_names)
    payload_time = scenario.events[0].time_s  # 3 s: 2.5 kg payload
    damage_time = scenario.events[1].time_s  # 7 s: joint 2's motor at 40 %

    on_monitor, latents, stamps, on_stats = _run(ros, adaptation=True)
    assert on_stats.policy_errors == 0 and on_stats.safe_ticks == 0
    assert latents, "no latent published"
    d = len(latents[0]) // 2
    times = np.array(stamps)
    assert (times > payload_time + 1.0).any()  # published through the fault
    values = np.array(latents)
    assert np.isfinite(values).all() and (values[:, d:] > 0).all()  # mean, positive std
    assert np.ptp(values[:, :d], axis=0).max() > 0  # the posterior is updated online
    # tracking stays bounded through the fault, adaptation on and off (measured 0.003)
    assert _window_mean(on_monitor, payload_time + 1.5, damage_time) < 0.03
    assert _window_mean(on_monitor, payload_time, payload_time + 0.5) < 0.03
    recovered_on = _window_mean(on_monitor, damage_time + 2.0, RUN_S)
    assert recovered_on < 0.05, recovered_on

    off_monitor, off_latents, _, off_stats = _run(ros, adaptation=False)
    assert off_stats.policy_errors == 0 and off_stats.safe_ticks == 0
    assert off_latents, "no latent published with adaptation off"
    off_values = np.array(off_latents)  # the prior N(0, I), never updated
    np.testing.assert_allclose(off_values[:, :d], 0.0, atol=1e-6)
    np.testing.assert_allclose(off_values[:, d:], 1.0, atol=1e-6)
    assert _window_mean(off_monitor, payload_time + 1.5, damage_time) < 0.03
    recovered_off = _window_mean(off_monitor, damage_time + 2.0, RUN_S)
    assert recovered_off < 0.05, recovered_off
    # with adaptation the arm recovers better from the motor damage, by a margin (shipped
    # model, last second of the run, measured: on 0.0223 rad, off 0.0284 rad; lockstep with
    # inline MAML makes both runs deterministic). After the payload the policies trained
    # since 2026-12-02 (with the fault episodes) track as well with the latent at the prior
    # as adapted (0.0029 both in 4.5-6.5 s), so the comparison is made after the motor damage.
    print(f"after the motor damage: adaptation on {recovered_on:.4f} rad, "
          f"off {recovered_off:.4f} rad")
    assert recovered_on < 0.9 * recovered_off, (recovered_on, recovered_off)
