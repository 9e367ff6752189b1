"""A killed recorder loses at most its last flush period, and ``metarl bag repair`` recovers
the rest into a bag that rosbags and the mcap readers open (issue #20, item 2).

The recorder executable runs as its own process (DDS on loopback, own domain) and is killed
with SIGKILL at a random moment while known messages arrive; the repaired bag must hold every
message up to about one second before the kill, in order, nothing else. Without ROS: bags cut
at random offsets, zero-filled tails, and the errors for what is not a recording.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import RosSession, domain_id, wait_for
from std_msgs.msg import String

from metarl_ros.cli.main import main as metarl_main
from metarl_ros.learning.sim_recording import CdrMessages
from metarl_ros.recording.bag import BagError, BagWriter, bag_is_complete, check_bag_folder
from metarl_ros.recording.repair import repair_bag

TOPIC = "/bag_recovery_chatter"
RATE_HZ = 200.0
FLUSH_PERIOD_S = 0.5
#: what a kill may cost: one flush period, plus slack for the writer thread and DDS delivery
MAX_LOSS_S = 1.0


@pytest.fixture(scope="module")
def ros():
    session = RosSession(domain_id(offset=47))
    yield session
    session.close()


def read_texts(bag: Path, storage: str) -> list[str]:
    """The chatter in ``bag`` with rosbags' AnyReader, and checked against mcap_ros2."""
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        texts = [reader.deserialize(raw, c.msgtype).data for c, _, raw in reader.messages()]
    if storage == "mcap":
        from mcap_ros2.reader import read_ros2_messages

        files = list(bag.glob("*.mcap"))
        assert len(files) == 1, files
        assert [m.ros_msg.data for m in read_ros2_messages(str(files[0]))] == texts
    return texts


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_sigkilled_recorder_loses_at_most_a_second(ros, tmp_path, storage):
    seed = random.randrange(1 << 30)
    kill_after_s = random.Random(seed).uniform(1.5, 3.0)
    bag = tmp_path / f"killed_{storage}"
    topic = f"{TOPIC}_{storage}"  # a killed recorder stays matched until its lease expires
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros.context.get_domain_id()), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "metarl_ros.nodes.recorder_node", "--ros-args",
         "-p", f"output:={bag}", "-p", f"topics:=['{topic}']",
         "-p", "types:=['std_msgs/msg/String']", "-p", f"storage:={storage}",
         "-p", "discovery_period_s:=0.05", "-p", f"flush_period_s:={FLUSH_PERIOD_S}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = ros.add(Node("recovery_chatter", context=ros.context))
    publisher = node.create_publisher(String, topic, QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    sent_at: list[float] = []
    stop = threading.Event()

    def publish() -> None:
        start = time.monotonic()
        while not stop.is_set():
            publisher.publish(String(data=str(len(sent_at))))
            sent_at.append(time.monotonic())
            delay = start + len(sent_at) / RATE_HZ - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    try:
        assert wait_for(lambda: publisher.get_subscription_count() > 0, 15.0), "no recorder"
        time.sleep(0.3)  # the recorder's subscription matched ours as well
        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        time.sleep(kill_after_s)
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        process.wait(timeout=10.0)
        stop.set()
        thread.join(timeout=5.0)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
        ros.remove(node)
    assert process.returncode == -signal.SIGKILL, output
    assert not bag_is_complete(bag)
    with pytest.raises(BagError, match="truncated bag.*metarl bag repair"):
        check_bag_folder(bag)

    assert metarl_main(["bag", "repair", str(bag)]) == 0
    assert bag_is_complete(bag) and (tmp_path / f"{bag.name}.orig").is_dir()
    texts = read_texts(bag, storage)
    must_have = sum(1 for t in sent_at if t <= killed_at - MAX_LOSS_S)
    context = (f"seed {seed}: killed after {kill_after_s:.2f} s, {len(sent_at)} sent, "
               f"{must_have} sent more than {MAX_LOSS_S} s before the kill, {len(texts)} "
               f"recovered\n{output}")
    # no gap, no duplicate, no junk (the order is the receive stamps', which the rmw does not
    # always give in publication order)
    assert sorted(map(int, texts)) == list(range(len(texts))), context
    assert must_have <= len(texts) <= len(sent_at), context
    assert must_have > RATE_HZ * 0.4, context
    print(context.splitlines()[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_recorder_stopped_by_a_signal_closes_a_complete_bag_quietly(ros, tmp_path, sig):
    """SIGINT (Ctrl-C) and SIGTERM (ros2 launch's escalation, systemd, docker stop): exit 0, a
    complete bag with every message, and no error line -- the bag is closed once the context
    is shut down, so its "closed" line must not go to /rosout (rcl refuses: "Failed to
    publish log message to rosout")."""
    bag = tmp_path / f"stopped_{sig.name}"
    topic = f"{TOPIC}_{sig.name}"
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros.context.get_domain_id()), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "metarl_ros.nodes.recorder_node", "--ros-args",
         "-p", f"output:={bag}", "-p", f"topics:=['{topic}']",
         "-p", "types:=['std_msgs/msg/String']", "-p", "discovery_period_s:=0.05"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = ros.add(Node(f"stopped_chatter_{sig.name}", context=ros.context))
    publisher = node.create_publisher(String, topic, QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    try:
        assert wait_for(lambda: publisher.get_subscription_count() > 0, 15.0), "no recorder"
        time.sleep(0.3)  # the recorder's subscription matched ours as well
        for i in range(100):
            publisher.publish(String(data=str(i)))
            time.sleep(0.005)
        time.sleep(0.3)  # delivered
        process.send_signal(sig)
        process.wait(timeout=15.0)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
        ros.remove(node)
    assert process.returncode == 0, output
    assert "Failed to publish" not in output and "Traceback" not in output, output
    assert "closed" in output and bag_is_complete(bag), output
    # every message, once (in receive-stamp order, not always publication order)
    assert sorted(map(int, read_texts(bag, "mcap"))) == list(range(100)), output


# ------------------------------------------------------------------------------------------
# Without ROS


def write_bag(path: Path, count: int, storage: str = "mcap", flush_every: int = 100) -> list:
    """``count`` String messages '0', '1', ...; flushed every ``flush_every`` messages; left
    unclosed (as a killed recorder leaves it). Returns the data file's size after each flush."""
    writer = BagWriter(path, storage=storage, flush_period_s=0.0)
    cdr = CdrMessages(writer.typestore)
    writer.add_topic("/numbers", "std_msgs/msg/String")
    sizes = []
    for i in range(count):
        writer.write("/numbers", 1_000_000_000 + i * 1_000_000, cdr.string(str(i)))
        if (i + 1) % flush_every == 0:
            writer.flush()
            sizes.append(writer._writer.storage.path.stat().st_size)
    writer._writer.abort()  # the process dies here: no summary, no metadata.yaml
    return sizes


def test_repair_recovers_every_flushed_message_wherever_the_file_is_cut(tmp_path):
    source = tmp_path / "source"
    flushed_sizes = write_bag(source, 1000)
    data = next(source.glob("*.mcap")).read_bytes()
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(data) + 1), 12)) + [len(data)]
    for n, cut in enumerate(cuts):
        for tail in (b"", b"\0" * 4096):  # a power loss can leave zeros after the data
            bag = tmp_path / f"cut{n}_{len(tail)}"
            bag.mkdir()
            (bag / f"{bag.name}.mcap").write_bytes(data[:cut] + tail)
            out = tmp_path / f"repaired{n}_{len(tail)}"
            try:
                result = repair_bag(bag, out=out)
            except BagError as exc:
                assert cut < 100 and "not an MCAP file" in str(exc), (cut, exc)  # header cut
                continue
            texts = read_texts(out, "mcap")
            assert texts == [str(i) for i in range(len(texts))], cut
            assert result.messages == len(texts)
            assert len(texts) >= 100 * sum(size <= cut for size in flushed_sizes), cut
            assert not list(tmp_path.glob(".repaired*")), "scratch folder left behind"
    # the whole file: every flushed message (all 1000; the last flush was after message 1000)
    assert texts == [str(i) for i in range(1000)]


def test_repair_in_place_keeps_the_original_and_out_leaves_it_alone(tmp_path):
    bag = tmp_path / "run"
    write_bag(bag, 250)  # flushed: 200; the 50 after the last flush are lost with the kill
    original = sorted((p.name, p.read_bytes()) for p in bag.iterdir())
    out = tmp_path / "fixed"
    assert repair_bag(bag, out=out).messages == 200
    assert sorted((p.name, p.read_bytes()) for p in bag.iterdir()) == original
    with pytest.raises(BagError, match="exists already"):
        repair_bag(bag, out=out)
    result = repair_bag(bag)
    assert result.path == bag and result.original == tmp_path / "run.orig"
    assert sorted((p.name, p.read_bytes()) for p in result.original.iterdir()) == original
    assert read_texts(bag, "mcap") == [str(i) for i in range(200)]
    assert not repair_bag(bag).repaired  # complete now: nothing to do
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["message_count"] == 200 and info["version"] == 9


def test_repair_of_a_sqlite3_bag_and_of_a_partial_metadata_file(tmp_path):
    bag = tmp_path / "humble"
    write_bag(bag, 250, storage="sqlite3")
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information:\n  version: 8\n  stor")
    assert repair_bag(bag).messages == 200
    assert read_texts(bag, "sqlite3") == [str(i) for i in range(200)]
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["storage_identifier"] == "sqlite3" and info["version"] == 8
    assert sorted(p.name for p in bag.iterdir()) == ["humble.db3", "metadata.yaml"]


def test_repair_names_what_is_not_a_recording(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "zero.mcap").write_bytes(b"")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "junk.mcap").write_bytes(b"not an mcap file at all")
    cases = {tmp_path / "missing": "bag not found", empty: "empty bag folder",
             other: "not a rosbag2 bag", zero: "empty bag: zero.mcap is 0 bytes",
             junk: "not an MCAP file"}
    for path, needle in cases.items():
        assert metarl_main(["bag", "repair", str(path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(path) in err and "truncated" not in err, err
    with pytest.raises(BagError, match="empty bag folder"):
        check_bag_folder(empty)  # what `metarl retrain` says of it too
    unreadable = tmp_path / "unreadable"
    write_bag(unreadable, 10, flush_every=5)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("metarl_ros.recording.mcap_salvage.open", refuse, raising=False)
    assert metarl_main(["bag", "repair", str(unreadable)]) == 2
    err = capsys.readouterr().err
    assert "cannot read: Permission denied" in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
