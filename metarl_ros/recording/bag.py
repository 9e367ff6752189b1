"""rosbag2 files without ROS -- the public names of :mod:`metarl_ros.recording` in one place.

Used by the recorder node (:mod:`metarl_ros.nodes.recorder_node`), ``metarl retrain``
(:mod:`metarl_ros.learning.bag_dataset`), ``metarl bag repair`` and the benchmarks. Built on
the ``rosbags`` library; no rclpy import here. The modules, one job each:

* :mod:`~metarl_ros.recording.formats` -- storage formats, versions, message types, QoS,
  :func:`check_bag_folder` (what a folder is: a bag, empty, truncated, not a bag);
* :mod:`~metarl_ros.recording.writer` -- :class:`BagWriter` / :class:`QueuedBagWriter`:
  raw CDR messages into a bag, flushed to disk every ``flush_period_s``;
* :mod:`~metarl_ros.recording.mcap_storage`, :mod:`~metarl_ros.recording.sqlite_storage` --
  the data files, written so that a kill loses only the last flush period;
* :mod:`~metarl_ros.recording.mcap_salvage` -- reading a cut MCAP file;
* :mod:`~metarl_ros.recording.repair` -- :func:`repair_bag`, a killed recording -> a bag;
* :mod:`~metarl_ros.recording.cdr` -- fast decoding of JointState and Float64MultiArray.
"""

from metarl_ros.recording.cdr import (
    CdrLayoutError,
    Float64ArrayDecoder,
    JointStateColumns,
    JointStateData,
    JointStateDecoder,
    JointStateLayout,
    decode_float64_array,
    decode_joint_state,
)
from metarl_ros.recording.formats import (
    DEFAULT_VERSION,
    FLOAT64_ARRAY,
    JOINT_STATE,
    STORAGE_FORMATS,
    STRING,
    BagError,
    StorageFormat,
    bag_is_complete,
    check_bag_folder,
    jazzy_typestore,
    make_qos,
)
from metarl_ros.recording.repair import RepairResult, repair_bag
from metarl_ros.recording.writer import FLUSH_PERIOD_S, BagWriter, QueuedBagWriter

__all__ = [
    "DEFAULT_VERSION", "FLOAT64_ARRAY", "FLUSH_PERIOD_S", "JOINT_STATE", "STORAGE_FORMATS",
    "STRING", "BagError", "BagWriter", "CdrLayoutError", "Float64ArrayDecoder",
    "JointStateColumns", "JointStateData", "JointStateDecoder", "JointStateLayout",
    "QueuedBagWriter", "RepairResult", "StorageFormat", "bag_is_complete", "check_bag_folder",
    "decode_float64_array", "decode_joint_state", "jazzy_typestore", "make_qos", "repair_bag",
]
