"""The nodes' hand-made CDR: effort commands written as bytes, joint states read from bytes.

Both are checked against rclpy's own serializer, which is what the middleware would have used.
"""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Duration, Time
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from metarl_ros.nodes.command_cdr import Float64ArrayEncoder, OnePointTrajectoryEncoder
from metarl_ros.nodes.common import stamp_to_s
from metarl_ros.nodes.joint_state_bytes import JointStateReader

LABELS = [None, "", "a", "ab", "abc", "abcd", "abcde", "stamp_ns:5",
          "stamp_ns:1796410216597965750"]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
def test_effort_bytes_are_the_message_rclpy_would_send(n):
    """Every label length (each pads differently) and array size: rclpy reads back the same
    message, and the bytes are as long as its own serialization (same alignment)."""
    encoder = Float64ArrayEncoder(n)
    rng = np.random.default_rng(n)
    for label in LABELS:
        values = rng.normal(size=n) * 100.0
        expected = Float64MultiArray(data=values.tolist())
        if label is not None:
            expected.layout.dim = [MultiArrayDimension(label=label, size=n, stride=n)]
        raw = encoder.encode(values, label)
        assert deserialize_message(raw, Float64MultiArray) == expected, label
        assert len(raw) == len(serialize_message(expected)), label


def test_effort_bytes_keep_every_float64_bit_and_refuse_a_wrong_size():
    encoder = Float64ArrayEncoder(3)
    values = np.array([np.nextafter(1.0, 2.0), -0.0, 5e-324])
    back = deserialize_message(encoder.encode(values, "x"), Float64MultiArray)
    assert np.array_equal(np.array(back.data).view(np.int64), values.view(np.int64))
    with pytest.raises(ValueError, match=r"\(2,\) values, expected \(3,\)"):
        encoder.encode(np.zeros(2))
    with pytest.raises(ValueError, match="n must be > 0"):
        Float64ArrayEncoder(0)


@pytest.mark.parametrize("names", [
    ["j1"], ["a", "bb", "ccc", "dddd", "eeeee"], [f"lbr_iiwa_joint_{i}" for i in range(1, 8)],
    ["gelenk_\u00fc"]])
def test_impedance_bytes_are_the_trajectory_rclpy_would_send(names):
    """Name lengths that pad every way, a non-ASCII name, several times from start."""
    n = len(names)
    rng = np.random.default_rng(n)
    for sec, nanosec in ((0, 10_000_000), (0, 0), (2, 999_999_999)):
        encoder = OnePointTrajectoryEncoder(names, (sec, nanosec))
        arrays = [rng.normal(size=n) for _ in range(4)]
        point = JointTrajectoryPoint(positions=arrays[0].tolist(), velocities=arrays[1].tolist(),
                                     accelerations=arrays[2].tolist(), effort=arrays[3].tolist(),
                                     time_from_start=Duration(sec=sec, nanosec=nanosec))
        expected = JointTrajectory(joint_names=names, points=[point])
        raw = encoder.encode(*arrays)
        assert deserialize_message(raw, JointTrajectory) == expected
        assert len(raw) == len(serialize_message(expected))
    with pytest.raises(ValueError, match=rf"\({n - 1},\) values, expected \({n},\)"):
        encoder.encode(arrays[0][:-1], *arrays[1:])
    with pytest.raises(ValueError, match="needs joint names"):
        OnePointTrajectoryEncoder([], (0, 0))


def _joint_state(names, position, velocity, effort=(), sec=1_796_410_216, nanosec=597_965_750,
                 frame_id="") -> JointState:
    msg = JointState(name=list(names), position=list(position), velocity=list(velocity),
                     effort=list(effort))
    msg.header.stamp = Time(sec=sec, nanosec=nanosec)
    msg.header.frame_id = frame_id
    return msg


@pytest.mark.parametrize("frame_id", ["", "b", "base_link", "abc"])
def test_joint_states_read_from_bytes_equal_rclpys_message(frame_id):
    """The fast reader gives what rclpy's message holds (stamp as stamp_to_s computes it), for
    several layouts in turn (names, sizes, an empty effort) and frame ids (alignment)."""
    reader = JointStateReader(max_names=64)
    rng = np.random.default_rng(0)
    layouts = [(["j1", "j2", "j3"], 3, 3, 3), (["j3", "joint_two", "j1"], 3, 3, 0),
               (["a"], 1, 1, 1), (["j1", "j2", "j3"], 3, 3, 3)]
    for names, n_p, n_v, n_e in layouts:
        for step in range(3):  # the first parses, the next take the fast path
            msg = _joint_state(names, rng.normal(size=n_p), rng.normal(size=n_v),
                               rng.normal(size=n_e), nanosec=step * 1_000_000,
                               frame_id=frame_id)
            fields = reader.read(serialize_message(msg))
            assert fields.stamp_s == stamp_to_s(msg.header.stamp)
            assert list(fields.names) == list(msg.name)
            for got, want in ((fields.position, msg.position), (fields.velocity, msg.velocity),
                              (fields.effort, msg.effort)):
                np.testing.assert_array_equal(np.asarray(got, dtype=float), np.asarray(want))


def test_oversized_and_foreign_joint_states_go_through_rclpys_deserializer(monkeypatch):
    """More names than the loop accepts: not one name read here (rclpy's reading, then the
    loop's refusal); bytes the fast decoder refuses (here: big-endian encapsulation, rewritten
    from little-endian) fall back too, and bytes that are no JointState raise."""
    import metarl_ros.nodes.joint_state_bytes as module
    import metarl_ros.recording.cdr as cdr

    reader = JointStateReader(max_names=4)
    names_read = []
    real_string_end = cdr._string_end
    monkeypatch.setattr(cdr, "_string_end", lambda raw, pos: names_read.append(pos) or
                        real_string_end(raw, pos))
    used = []
    monkeypatch.setattr(module, "deserialize_message",
                        lambda raw, kind: used.append(raw) or deserialize_message(raw, kind))
    big = serialize_message(_joint_state([f"j{i}" for i in range(5)], range(5), range(5)))
    fields = reader.read(big)
    assert len(fields.names) == 5 and names_read == []  # rclpy's reading, the loop refuses it
    assert used == [big]
    small = _joint_state(["j0"], [1.5], [2.5])
    assert reader.read(serialize_message(small)).position[0] == 1.5 and names_read != []
    assert used == [big]  # read here, not by rclpy

    used.clear()
    foreign = bytearray(serialize_message(small))
    foreign[1] = 0  # claims big-endian: the fast decoder refuses, rclpy's is asked
    with pytest.raises(Exception):  # noqa: B017 - whatever rclpy raises on garbage
        reader.read(bytes(foreign))
    assert used == [bytes(foreign)]
    with pytest.raises(Exception):  # noqa: B017
        reader.read(b"\x00\x01\x00\x00\xff")
