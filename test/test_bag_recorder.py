"""recorder_node over real DDS (loopback, own domain): record, read back independently, retrain.

A lockstep sim_node + adapter_node (policy ``pd``) run with a mid-run fault is recorded by
the recorder node to MCAP; the bag is read with the ``mcap`` + ``mcap-ros2-support`` packages
(an independent reader) and must hold what was published; ``metarl retrain`` from it gives a
model that does better on the recorded fault. The recorder executable itself is checked for a
clean close on a double SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bag_helpers import FAULT_LABEL, JOINTS, RUN_S, tiny_model, write_scenario, write_tiny_env
from rclpy.node import Node
from ros_harness import Collector, RosSession, domain_id, params, wait_for
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.nodes.adapter_node import AdapterNode
from metarl_ros.nodes.common import COMMAND_QOS, LATCHED_QOS, STATE_QOS
from metarl_ros.nodes.recorder_node import RecorderNode
from metarl_ros.nodes.sim_node import SimNode
from metarl_ros.recording.bag import JointStateDecoder, bag_is_complete, decode_float64_array

torch.set_num_threads(1)
COMMANDS = "/effort_controller/commands"


@pytest.fixture(scope="module")
def ros():
    session = RosSession(domain_id(offset=41))
    yield session
    session.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dds_bag")


@pytest.fixture(scope="module")
def env(folder) -> Path:
    return write_tiny_env(folder)


@pytest.fixture(scope="module")
def recorded(ros, folder, env):
    """Record the run; returns (bag path, recorder counts, probe's joint states, sim)."""
    probe = ros.add(Node("bag_probe", context=ros.context))
    states, tasks = Collector(), Collector()
    probe.create_subscription(JointState, "/joint_states", states, STATE_QOS)
    probe.create_subscription(String, "/sim/true_task", tasks, LATCHED_QOS)
    # The recorder subscribes to a topic once it sees a publisher. Recording starts before the
    # controller exists, as `ros2 bag record` would be started before a launch: a stand-in
    # command publisher lets it subscribe to the command topic ahead of the adapter.
    probe.create_publisher(Float64MultiArray, COMMANDS, COMMAND_QOS)
    bag = folder / "run_bag"
    recorder = ros.add(RecorderNode(context=ros.context,
                                    parameter_overrides=params(output=str(bag))))
    sim = ros.add(SimNode(context=ros.context, parameter_overrides=params(
        env_config=str(env), scenario=str(write_scenario(folder)), real_time_factor=0.0,
        duration_s=RUN_S)))
    wanted = {"/joint_states", "/reference", "/sim/true_task", "/diagnostics", COMMANDS}
    assert wait_for(lambda: wanted <= set(recorder.subscribed_topics), 10.0), \
        recorder.subscribed_topics
    assert wait_for(lambda: recorder.received["/joint_states"] > 0 and len(states) > 0, 10.0)
    ros.add(AdapterNode(context=ros.context, parameter_overrides=params(
        env_config=str(env), use_sim_time=True)))
    assert wait_for(sim.finished.is_set, 60.0), f"sim stuck at t={sim.sim.time_s}"
    # everything published since the recorder subscribed has arrived (the probe, subscribed
    # before the simulator existed, may also hold t = 0 re-published before that)
    final = int(RUN_S * 100)  # instants 0 .. 1.99 s: sim_node stops at 2 s, unpublished

    def arrived() -> bool:
        last = states.snapshot()[-1].header.stamp
        return (recorder.received[COMMANDS] == sim.commands_received
                and (last.sec, last.nanosec) == (1, 990_000_000)
                and recorder.received["/joint_states"] >= final)
    assert wait_for(arrived, 10.0), (recorder.received, sim.commands_received, len(states))
    time.sleep(0.2)
    counts = dict(recorder.received)
    lost = dict(recorder.lost)
    ros.remove(recorder)  # destroy_node closes the bag
    yield bag, counts, lost, states.snapshot(), tasks.snapshot(), sim
    ros.remove_all()


def test_recorded_bag_reads_back_with_an_independent_reader(recorded):
    from mcap_ros2.reader import read_ros2_messages

    bag, counts, lost, states, tasks, sim = recorded
    assert bag_is_complete(bag)
    assert not any(lost.values()), lost
    messages = list(read_ros2_messages(str(next(bag.glob("*.mcap")))))
    by_topic = Counter(m.channel.topic for m in messages)
    assert dict(by_topic) == {t: c for t, c in counts.items() if c}
    metadata = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["message_count"] == len(messages) and metadata["version"] == 9
    assert metadata["storage_identifier"] == "mcap"
    # content: the joint states the probe saw since the recorder subscribed, bit for bit
    recorded_states = [m.ros_msg for m in messages if m.channel.topic == "/joint_states"]
    assert len(states) - 3 <= len(recorded_states) <= len(states)
    for mine, theirs in zip(recorded_states, states[len(states) - len(recorded_states):]):
        assert (mine.header.stamp.sec, mine.header.stamp.nanosec) == (
            theirs.header.stamp.sec, theirs.header.stamp.nanosec)
        assert list(mine.name) == list(theirs.name) == JOINTS
        assert list(mine.position) == list(theirs.position)
        assert list(mine.velocity) == list(theirs.velocity)
    stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in recorded_states}
    assert len(stamps) == int(RUN_S * 100)  # every control instant 0 .. 1.99 s
    # every command the simulator received, and the true task events
    assert by_topic[COMMANDS] == sim.commands_received
    events = [json.loads(m.ros_msg.data) for m in messages if m.channel.topic == "/sim/true_task"]
    assert [e["label"] for e in events] == ["initial", FAULT_LABEL]
    assert events[1]["time_s"] == pytest.approx(1.0)
    assert [json.loads(m.data)["label"] for m in tasks] == ["initial", FAULT_LABEL]
    # our fast decoders read the recorded bytes (rmw's serialization) as mcap_ros2 does
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    decoder = JointStateDecoder()
    with open(next(bag.glob("*.mcap")), "rb") as stream:
        reader = make_reader(stream, decoder_factories=[DecoderFactory()])
        for _, channel, message, decoded in reader.iter_decoded_messages(
                topics=["/joint_states", "/reference", COMMANDS]):
            if channel.topic == COMMANDS:
                assert list(decode_float64_array(message.data)) == list(decoded.data)
            else:
                got = decoder(message.data)
                assert got.names == tuple(decoded.name)
                assert list(got.position) == list(decoded.position)
                assert list(got.velocity) == list(decoded.velocity)
                assert list(got.effort) == list(decoded.effort)


def test_retrain_from_the_recorded_bag_beats_the_input_model(recorded, env, folder, capsys):
    bag = recorded[0]
    model = tiny_model(env, folder / "model_run")
    config = folder / "retrain.yaml"
    config.write_text(yaml.safe_dump({"training": {"updates": 600, "batch_size": 64},
                                      "evaluation": {"seeds": [0, 1]}}))
    out = folder / "retrained"
    code = metarl_main(["retrain", "--bag", str(bag), "--model", str(model), "--out", str(out),
                        "--config", str(config), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "retrain.json").read_text())
    read = report["bags_read"][0]
    # 200 instants, 199 transitions; at most the re-published t = 0 instant is extra
    assert read["control_instants"] == 200 and read["transitions"] == 199, read
    assert set(read["dropped"]) <= {"commands: more than one for an instant (first used)"}
    assert [t["transitions"] for t in report["tasks"]] == [100, 99]
    evaluation = json.loads((out / "eval.json").read_text())
    before, after = evaluation["before"], evaluation["after"]
    assert after["post_fault_return_mean"] > before["post_fault_return_mean"] + 10.0, (
        before, after)
    assert (out / "onnx" / "policy.onnx").is_file() and (out / "model.pt").is_file()


def test_recorder_executable_closes_the_bag_on_double_sigint(ros, tmp_path):
    bag = tmp_path / "sigint_bag"
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros.context.get_domain_id()),
               PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "metarl_ros.nodes.recorder_node", "--ros-args",
         "-p", f"output:={bag}", "-p", "topics:=['/bag_test_chatter']",
         "-p", "discovery_period_s:=0.05"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = ros.add(Node("chatter", context=ros.context))
    publisher = node.create_publisher(String, "/bag_test_chatter", STATE_QOS)
    try:
        assert wait_for(lambda: publisher.get_subscription_count() > 0, 20.0)
        for i in range(200):
            publisher.publish(String(data=f"message {i}"))
            time.sleep(0.002)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
        process.send_signal(signal.SIGINT)  # a second Ctrl-C while shutting down
        output, _ = process.communicate(timeout=20.0)
    finally:
        if process.poll() is None:
            process.kill()
        ros.remove(node)
    assert process.returncode == 0, output
    assert bag_is_complete(bag), output
    assert "closed" in output and "200 messages" in output, output
    from mcap_ros2.reader import read_ros2_messages

    texts = [m.ros_msg.data for m in read_ros2_messages(str(next(bag.glob("*.mcap"))))]
    assert texts == [f"message {i}" for i in range(200)]


def test_recorder_refuses_an_existing_bag_directory(ros, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(ValueError, match="exists already"):
        RecorderNode(context=ros.context, parameter_overrides=params(output=str(existing)))
    assert list(existing.iterdir()) == []


def test_sqlite3_storage_writes_a_humble_bag(ros, tmp_path):
    """storage: sqlite3 writes rosbag2 metadata version 8, readable by rosbags."""
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "humble_bag"
    recorder = ros.add(RecorderNode(context=ros.context, parameter_overrides=params(
        output=str(bag), storage="sqlite3", topics=["/bag_test_numbers"])))
    node = ros.add(Node("numbers", context=ros.context))
    publisher = node.create_publisher(Float64MultiArray, "/bag_test_numbers", STATE_QOS)
    assert wait_for(lambda: publisher.get_subscription_count() > 0, 10.0)
    for i in range(20):
        publisher.publish(Float64MultiArray(data=[float(i), 2.0 * i]))
    assert wait_for(lambda: recorder.received.get("/bag_test_numbers") == 20, 5.0)
    ros.remove(recorder)
    ros.remove(node)
    metadata = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["version"] == 8 and metadata["storage_identifier"] == "sqlite3"
    with Reader(bag) as reader:
        data = [np.asarray(decode_float64_array(raw)) for _, _, raw in reader.messages()]
    assert [list(d) for d in data] == [[float(i), 2.0 * i] for i in range(20)]
