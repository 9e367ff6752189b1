"""The adapt_sim graph description, the launch file derived from it, and `metarl launch`."""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import yaml
from ros_harness import domain_id

from metarl_ros.graph.runner import node_arguments
from metarl_ros.graph.spec import ADAPT_SIM_ARGUMENTS, adapt_sim_graph, parameter_file_path

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILE = REPO / "launch" / "adapt_sim.launch.py"
@functools.lru_cache(maxsize=1)
def _domain() -> int:
    return domain_id(offset=37)


# ------------------------------------------------------------------------------ graph


def test_default_graph_nodes_and_parameters():
    graph = adapt_sim_graph()
    assert [n.name for n in graph.nodes] == ["sim_node", "adapter_node"]
    sim, adapter = graph.node("sim_node"), graph.node("adapter_node")
    assert (sim.package, sim.executable) == ("metarl_ros", "sim_node")
    assert (adapter.package, adapter.executable) == ("metarl_ros", "adapter_node")
    assert sim.parameter_files == ("config/sim_node.yaml",)
    assert adapter.parameter_files == ("config/adapter_node.yaml",)
    assert sim.parameters == {
        "env_config": "sim/envs/iiwa7_compliant.yaml", "scenario": "config/scenarios/default.yaml",
        "real_time_factor": 1.0, "gui": False, "controller_name": "effort_controller",
        "command_interface": "effort", "use_sim_time": True, "reference_preview": 0.0}
    assert adapter.parameters == {
        "env_config": "sim/envs/iiwa7_compliant.yaml", "policy": "pd", "model_path": "",
        "adaptation": True, "parameter_adaptation": False, "maml": True,
        "adaptation_schedule": "background", "controller_name": "effort_controller",
        "command_type": "effort", "use_sim_time": True}
    assert isinstance(sim.parameters["real_time_factor"], float)
    assert graph.notes == ()


def test_graph_from_argument_values():
    graph = adapt_sim_graph({"policy": "pearl", "model": "m/x.pt", "adaptation": "False",
                             "real_time_factor": "0", "gui": "true", "record": "true",
                             "controller": "arm_effort", "use_sim_time": "false"})
    sim, adapter = graph.node("sim_node"), graph.node("adapter_node")
    assert adapter.parameters["model_path"] == "m/x.pt"
    assert adapter.parameters["adaptation"] is False
    assert sim.parameters["real_time_factor"] == 0.0 and sim.parameters["gui"] is True
    # lockstep: MAML steps follow the transitions, not the wall clock
    assert adapter.parameters["adaptation_schedule"] == "inline"
    assert sim.parameters["controller_name"] == "arm_effort"
    assert adapter.parameters["controller_name"] == "arm_effort"
    assert sim.parameters["use_sim_time"] is False
    assert any("record" in note for note in graph.notes)
    adapting = adapt_sim_graph({"policy": "onnx", "parameter_adaptation": "true"})
    assert adapting.node("onnx_policy_node").parameters["parameter_adaptation"] is True
    # act_ahead: the parameter file's unless given; the preview goes to sim_node
    assert "act_ahead" not in adapting.node("onnx_policy_node").parameters
    ahead = adapt_sim_graph({"policy": "pearl", "act_ahead": "true", "reference_preview": "0.005"})
    assert ahead.node("adapter_node").parameters["act_ahead"] is True
    assert ahead.node("sim_node").parameters["reference_preview"] == 0.005


@pytest.mark.parametrize("values,needle", [
    ({"polcy": "pd"}, "unknown launch argument"),
    ({"policy": "sac"}, "expected one of pd, pearl"),
    ({"gui": "yes"}, "expected true or false"),
    ({"real_time_factor": "fast"}, "expected a number"),
    ({"act_ahead": "yes"}, "expected one of file, true, false"),
])
def test_bad_arguments_are_named(values, needle):
    with pytest.raises(ValueError) as info:
        adapt_sim_graph(values)
    assert needle in str(info.value)


def test_parameter_files_match_what_the_nodes_declare():
    """Every YAML key is a declared parameter of that node, with the declared type."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=_domain())
    try:
        for spec in adapt_sim_graph().nodes:
            path = parameter_file_path(spec.parameter_files[0])
            data = yaml.safe_load(Path(path).read_text())[spec.name]["ros__parameters"]
            module = importlib.import_module(spec.module)
            cli_args, overrides = node_arguments(spec)
            node = getattr(module, spec.node_class)(
                node_name=spec.name, context=context, cli_args=cli_args,
                parameter_overrides=overrides)
            try:
                for key, value in data.items():
                    assert node.has_parameter(key), f"{path}: {key} is not a parameter"
                    assert type(node.get_parameter(key).value) is type(value), key
                for key, value in spec.parameters.items():  # overrides win over the file
                    assert node.get_parameter(key).value == value, key
                # a value only in the file arrives too
                if spec.name == "adapter_node":
                    assert node.get_parameter("context_rate_hz").value == data["context_rate_hz"]
            finally:
                node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


# ------------------------------------------------------------------------------ launch file


def test_launch_file_is_derived_from_the_graph():
    """Static check (always runs): the launch file builds its nodes from metarl_ros.graph."""
    tree = ast.parse(LAUNCH_FILE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "metarl_ros.graph.spec" for alias in node.names}
    assert {"ADAPT_SIM_ARGUMENTS", "adapt_sim_graph"} <= imported
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions


class _Recorded:
    """Stands in for a launch action class; records its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _fake_launch_modules(values: dict[str, str]) -> dict[str, types.ModuleType]:
    """Minimal launch/launch_ros stand-ins with the API the launch file uses."""

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    class ParameterValue:
        def __init__(self, value, *, value_type=None):
            self.value, self.value_type = value, value_type

    class LaunchDescription(list):
        pass

    modules = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.substitutions", "launch_ros", "launch_ros.actions",
        "launch_ros.parameter_descriptions")}
    modules["launch"].LaunchDescription = LaunchDescription
    for cls in ("DeclareLaunchArgument", "LogInfo", "OpaqueFunction"):
        setattr(modules["launch.actions"], cls, type(cls, (_Recorded,), {}))
    modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    modules["launch_ros.actions"].Node = type("Node", (_Recorded,), {})
    modules["launch_ros.parameter_descriptions"].ParameterValue = ParameterValue
    return modules


def _load_launch_file(name: str = "adapt_sim"):
    """Import ``launch/<name>.launch.py`` as a module (with whatever ``launch`` is importable)."""
    path = REPO / "launch" / f"{name}.launch.py"
    spec = importlib.util.spec_from_file_location(f"{name}_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in_launch_description(monkeypatch, name: str, values: dict[str, str]):
    """``launch/<name>.launch.py``'s description, built against stand-ins of the launch API."""
    for module_name, module in _fake_launch_modules(values).items():
        monkeypatch.setitem(sys.modules, module_name, module)
    return _load_launch_file(name).generate_launch_description()


def _check_nodes_against_graph(nodes, graph, unwrap):
    assert len(nodes) == len(graph.nodes)
    for action, spec in zip(nodes, graph.nodes):
        kw = action.kwargs
        assert (kw["package"], kw["executable"], kw["name"]) == (
            spec.package, spec.executable, spec.name)
        assert kw["output"] == "screen"
        files, overrides = kw["parameters"][:-1], kw["parameters"][-1]
        assert files == [parameter_file_path(f) for f in spec.parameter_files]
        assert {k: unwrap(v) for k, v in overrides.items()} == dict(spec.parameters)
        assert kw["remappings"] == list(spec.remappings)


def test_launch_file_against_stand_in_launch_api(monkeypatch):
    """The launch file's logic, run against stand-ins of the launch API it calls."""
    values = {arg.name: arg.default for arg in ADAPT_SIM_ARGUMENTS}
    values.update(policy="pearl", record="true", real_time_factor="0.5")
    description = stand_in_launch_description(monkeypatch, "adapt_sim", values)
    declared = [a for a in description if type(a).__name__ == "DeclareLaunchArgument"]
    assert [a.args[0] for a in declared] == [arg.name for arg in ADAPT_SIM_ARGUMENTS]
    defaults = [a.kwargs["default_value"] for a in declared]
    assert defaults == [a.default for a in ADAPT_SIM_ARGUMENTS]
    opaque = [a for a in description if type(a).__name__ == "OpaqueFunction"]
    assert len(opaque) == 1
    actions = opaque[0].kwargs["function"](values)
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    logs = [a for a in actions if type(a).__name__ == "LogInfo"]
    assert len(logs) == 1 and "record" in logs[0].kwargs["msg"]

    def unwrap(v):
        if type(v).__name__ == "ParameterValue":
            assert v.value_type is str
            return v.value
        return v

    _check_nodes_against_graph(nodes, adapt_sim_graph(values), unwrap)


def test_launch_file_with_the_real_launch_library():
    try:
        import launch_ros  # noqa: F401

        import launch  # noqa: F401
    except ImportError:
        reason = ("the `launch`/`launch_ros` libraries are not installed (the index's ROS wheels "
                  "do not ship them); the launch file was checked against stand-ins instead")
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchContext

    description = _load_launch_file().generate_launch_description()
    context = LaunchContext()
    declared = [e for e in description.entities if isinstance(e, DeclareLaunchArgument)]
    assert [d.name for d in declared] == [a.name for a in ADAPT_SIM_ARGUMENTS]
    for d in declared:
        d.visit(context)
    opaque = [e for e in description.entities if isinstance(e, OpaqueFunction)][0]
    nodes = [a for a in opaque.execute(context) if type(a).__name__ == "Node"]
    graph = adapt_sim_graph()
    assert [n.node_executable for n in nodes] == [s.executable for s in graph.nodes]


# ------------------------------------------------------------------------------ metarl launch


def _env():
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(_domain()), ROS_LOCALHOST_ONLY="1",
               ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    return env


def _cli(*args):
    return [sys.executable, "-m", "metarl_ros.cli.launch", *args]


def test_metarl_launch_runs_the_graph_for_a_duration():
    proc = subprocess.run(_cli("adapt_sim", "real_time_factor:=0.0", "--duration", "1.0"),
                          env=_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sim_node: t = 1.00 s simulated" in out
    assert "commands 100 (0 rejected), lockstep timeouts 0" in out
    assert "adapter_node: ticks 100, safe_ticks 0, policy_errors 0" in out
    assert "Traceback" not in out


def test_metarl_launch_runs_the_graph_with_impedance_commands():
    """command_type:=impedance: adapter_node sends setpoints + feed-forward, sim_node closes
    the impedance loop at every physics step. The PD + nominal feed-forward on the intact arm
    tracks as well as with efforts held for a control period (measured over 3 s: 0.52 vs
    0.51 mrad; a setpoint held still instead of moving along the reference: 4.6)."""
    runs = {}
    for kind in ("effort", "impedance"):
        proc = subprocess.run(_cli("adapt_sim", "real_time_factor:=0.0", "scenario:=",
                                   f"command_type:={kind}", "--duration", "1.0"),
                              env=_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "commands 100 (0 rejected), lockstep timeouts 0" in out, out
        assert "Traceback" not in out
        runs[kind] = float(out.split("tracking RMS ")[1].split(" mrad")[0])
    assert 0.0 < runs["impedance"] < 2.0 and runs["impedance"] < 1.5 * runs["effort"], runs


def test_metarl_launch_rejects_bad_arguments():
    proc = subprocess.run(_cli("adapt_sim", "policy:=sac"), env=_env(), capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2 and "expected one of pd, pearl" in proc.stderr


def test_metarl_launch_double_sigint_exits_cleanly():
    proc = subprocess.Popen(_cli("adapt_sim", "real_time_factor:=1.0"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "policy 'pd'" in line or not line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # as from ros2 launch forwarding plus the terminal
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 0, out
    assert "SIGINT: shutting down" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


def _reader(proc, lines):
    """Collect a process's output in a thread (readline must never block the test)."""
    import threading

    def pump():
        for line in proc.stdout:
            lines.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _wait_or_dump(name: str, proc: subprocess.Popen, lines: list[str], reader: threading.Thread,
                  timeout: float) -> None:
    """Wait for ``proc``; if it hangs, fail with its output and every thread's Python stack.

    The process must run with ``PYTHONFAULTHANDLER=1``: SIGABRT then makes it print the
    stacks (faulthandler) before it dies, so a hang that happens only on a loaded CI machine
    says where it hangs.
    """
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    pytest.fail(f"{name} did not exit within {timeout} s of a signal; its output and stacks:\n"
                + "".join(lines))


def _has_events_executor() -> bool:
    try:
        from rclpy.experimental import EventsExecutor  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("executor", [
    "single",
    pytest.param("events", marks=pytest.mark.skipif(
        not _has_events_executor(), reason="this rclpy has no EventsExecutor")),
])
def test_node_executables_run_as_processes_and_stop_cleanly_on_sigint(executor):
    """`python -m metarl_ros.nodes.<node>` (what ros2 run starts): params file, loop, shutdown.

    With ``executor:=events`` adapter_node spins rclpy's EventsExecutor (on sim time, in
    lockstep): its ``spin()`` alone would not return on SIGINT."""
    graph = adapt_sim_graph({"real_time_factor": "0.0"})
    env = _env()
    env.update(RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONFAULTHANDLER="1")
    procs, lines, readers = {}, {}, {}
    try:
        for spec in graph.nodes:
            cmd = [sys.executable, "-m", spec.module, "--ros-args"]
            for path in spec.parameter_files:
                cmd += ["--params-file", parameter_file_path(path)]
            for key, value in spec.parameters.items():
                text = str(value).lower() if isinstance(value, bool) else str(value) or "''"
                cmd += ["-p", f"{key}:={text}"]
            if spec.name == "adapter_node":
                cmd += ["-p", f"executor:={executor}"]
            procs[spec.name] = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)
            lines[spec.name] = []
            readers[spec.name] = _reader(procs[spec.name], lines[spec.name])
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # the loop closes: the payload event fires at 3 s
            if any("scheduled fault: payload" in line for line in list(lines["sim_node"])):
                break
            if any(proc.poll() is not None for proc in procs.values()):
                break
            time.sleep(0.05)
        assert any("scheduled fault: payload" in line for line in lines["sim_node"]), lines
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        procs["adapter_node"].send_signal(signal.SIGINT)  # a second one, as ros2 launch may
        for name, proc in procs.items():
            _wait_or_dump(name, proc, lines[name], readers[name], timeout=20)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, proc in procs.items():
        readers[name].join(timeout=5)
        out = "".join(lines[name])
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out}"
        assert "Traceback" not in out, out


_STUCK_NODE = textwrap.dedent("""
    import time

    from rclpy.node import Node

    from metarl_ros.nodes.common import run_node


    def hang_in_teardown():
        time.sleep(120)


    class StuckNode(Node):
        def __init__(self):
            super().__init__("stuck_in_teardown")
            self.create_timer(0.05, lambda: print("spinning", flush=True))

        def destroy_node(self):
            hang_in_teardown()


    raise SystemExit(run_node(StuckNode))
""")


def _interrupted(program: str, ready: str, timeout: float,
                 sig: signal.Signals = signal.SIGINT) -> tuple[int, str]:
    """Run ``program`` (``python -c``), send ``sig`` once it prints ``ready``, wait up to
    ``timeout`` s: its exit code and output (with the stacks, failing, if it hangs)."""
    env = dict(_env(), PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, "-c", program], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = _reader(proc, lines)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(ready in x for x in list(lines)):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.01)
        proc.send_signal(sig)
        _wait_or_dump("the node", proc, lines, reader, timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode, "".join(lines)


def test_a_node_whose_teardown_hangs_says_where_and_exits_1():
    """run_node bounds teardown (TEARDOWN_TIMEOUT_S): a node stuck in it prints every thread's
    stack and exits 1 instead of waiting to be killed."""
    from metarl_ros.nodes.common import TEARDOWN_TIMEOUT_S

    code, out = _interrupted(_STUCK_NODE, "spinning", timeout=TEARDOWN_TIMEOUT_S + 10)
    assert code == 1, out
    assert "Timeout" in out and "hang_in_teardown" in out, out


_BUSY_NODE = textwrap.dedent("""
    import time

    from rclpy.node import Node

    from metarl_ros.nodes.common import run_node


    class BusyNode(Node):
        def __init__(self):
            super().__init__("busy_callback")
            self.create_timer(0.05, self.busy)

        def busy(self):
            print("callback started", flush=True)
            end = time.monotonic() + 1.0
            while time.monotonic() < end:  # Python bytecode all along: where a signal lands
                pass
            print("callback finished", flush=True)


    raise SystemExit(run_node(BusyNode))
""")


def test_a_signal_stops_a_node_between_callbacks_not_inside_one():
    """SIGINT while a callback runs (a control tick, in a node): the callback finishes, then
    the node stops cleanly -- no KeyboardInterrupt lands inside it (or inside rclpy)."""
    code, out = _interrupted(_BUSY_NODE, "callback started", timeout=20)
    assert code == 0, out
    assert "callback finished" in out and "Traceback" not in out, out


_SLOW_START_NODE = textwrap.dedent("""
    import time

    from rclpy.node import Node
    from std_msgs.msg import String

    from metarl_ros.nodes.common import run_node


    class SlowStartNode(Node):  # a model loaded and exported before the node's publishers
        def __init__(self):
            super().__init__("slow_start")
            print("starting", flush=True)
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                pass
            print("started", flush=True)
            self.create_publisher(String, "~/out", 10)


    raise SystemExit(run_node(SlowStartNode))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_abandons_it_and_exits_0(sig):
    """ros2 launch stopped (or systemd, docker) while a node still loads: the start-up stops
    at once and the node exits 0 -- not a FATAL 'context is invalid' from the next rclpy call
    after rclpy's handler shut the context down."""
    code, out = _interrupted(_SLOW_START_NODE, "starting", timeout=20, sig=sig)
    assert code == 0, out
    assert "started" not in out, out  # abandoned, not run to its end
    assert "FATAL" not in out and "Traceback" not in out, out


# ------------------------------------------------------------------------------ deploy graph


def test_deploy_graph_records_the_robots_topics_with_record_true():
    from metarl_ros.graph.spec import deploy_graph

    assert [n.name for n in deploy_graph().nodes] == ["onnx_policy_node"]
    assert deploy_graph().notes == ()
    graph = deploy_graph({"record": "true", "bag": "/data/run1", "joint_states": "robot/states",
                          "reference": "/plan/reference", "controller": "arm_effort"})
    assert [n.name for n in graph.nodes] == ["recorder_node", "onnx_policy_node"]
    recorder = graph.node("recorder_node")
    assert recorder.parameter_files == ("config/recorder_node.yaml",)
    assert recorder.parameters["output"] == "/data/run1"
    # the names the robot uses (remapped; relative taken at the root), each with its type
    assert dict(zip(recorder.parameters["topics"], recorder.parameters["types"])) == {
        "/robot/states": "sensor_msgs/msg/JointState",
        "/arm_effort/commands": "std_msgs/msg/Float64MultiArray",
        "/plan/reference": "sensor_msgs/msg/JointState",
        "/onnx_policy_node/latent": "std_msgs/msg/Float64MultiArray",
        "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    }
    assert graph.notes == ("record:=true: recorder_node writes /robot/states, "
                           "/arm_effort/commands, /plan/reference, /onnx_policy_node/latent, "
                           "/diagnostics to /data/run1",)
    # the controller node is the same as without recording
    assert graph.node("onnx_policy_node") == deploy_graph(
        {"joint_states": "robot/states", "reference": "/plan/reference",
         "controller": "arm_effort"}).node("onnx_policy_node")

    trajectory = deploy_graph({"record": "true", "command_type": "trajectory",
                               "command_topic": "/arm/cmd"}).node("recorder_node")
    topics = dict(zip(trajectory.parameters["topics"], trajectory.parameters["types"]))
    assert topics["/arm/cmd"] == "trajectory_msgs/msg/JointTrajectory"
    assert "/effort_controller/joint_trajectory" not in topics
    assert trajectory.parameters["output"] == ""
    with pytest.raises(ValueError, match="reference and joint_states are both on /joint_states"):
        deploy_graph({"record": "true", "reference": "/joint_states"})
    with pytest.raises(ValueError, match="record:='yes': expected true or false"):
        deploy_graph({"record": "yes"})


def test_deploy_launch_file_with_record_against_stand_in_launch_api(monkeypatch):
    from metarl_ros.graph.spec import DEPLOY_ARGUMENTS, deploy_graph

    values = {arg.name: arg.default for arg in DEPLOY_ARGUMENTS}
    values.update(record="true", bag="/data/run2", joint_states="/robot/joint_states")
    description = stand_in_launch_description(monkeypatch, "deploy", values)
    declared = {a.args[0]: a.kwargs for a in description
                if type(a).__name__ == "DeclareLaunchArgument"}
    assert declared["record"]["default_value"] == "false"
    assert declared["record"]["choices"] == ["true", "false"]
    assert declared["bag"]["default_value"] == ""
    opaque = [a for a in description if type(a).__name__ == "OpaqueFunction"][0]
    actions = opaque.kwargs["function"](values)
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    logs = [a.kwargs["msg"] for a in actions if type(a).__name__ == "LogInfo"]
    assert [n.kwargs["name"] for n in nodes] == ["recorder_node", "onnx_policy_node"]
    assert len(logs) == 1 and "/robot/joint_states" in logs[0] and "/data/run2" in logs[0]

    def unwrap(v):
        return v.value if type(v).__name__ == "ParameterValue" else v

    _check_nodes_against_graph(nodes, deploy_graph(values), unwrap)


def test_metarl_launch_deploy_record_writes_a_closed_bag_of_the_robot_run(tmp_path):
    """deploy record:=true against a stand-in robot (joint states + reference at 100 Hz on
    remapped topics): the bag is closed and holds the robot's states, the node's commands,
    the reference, the latent and diagnostics."""
    import rclpy
    from rclpy.context import Context
    from sensor_msgs.msg import JointState

    from metarl_ros.nodes.common import STATE_QOS, ns_to_stamp
    from metarl_ros.recording.bag import bag_is_complete
    from metarl_ros.sim.env_config import load_env_setup

    model = REPO / "models" / "pearl" / "onnx"
    if not (model / "policy.onnx").is_file():
        pytest.skip(f"{model} is not there (export it with `metarl export`)")
    setup = load_env_setup()
    names = list(setup.robot.joint_names)
    q = list(setup.robot.default_pose)
    bag = tmp_path / "deploy_bag"
    proc = subprocess.Popen(
        _cli("deploy", f"model:={model}", "record:=true", f"bag:={bag}",
             "joint_states:=/robot/joint_states", "--duration", "6.0"),
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = _reader(proc, lines)
    context = Context()
    rclpy.init(context=context, domain_id=_domain())
    published = 0
    try:
        node = rclpy.create_node("fake_robot", context=context)
        states = node.create_publisher(JointState, "/robot/joint_states", STATE_QOS)
        refs = node.create_publisher(JointState, "/reference", STATE_QOS)
        deadline = time.monotonic() + 40
        while proc.poll() is None and time.monotonic() < deadline:
            if states.get_subscription_count() >= 2 and refs.get_subscription_count() >= 2:
                stamp = ns_to_stamp(time.time_ns())  # wall clock: use_sim_time is false
                ref = JointState(name=names, position=q, velocity=[0.0] * len(q),
                                 effort=[0.0] * len(q))
                ref.header.stamp = stamp
                refs.publish(ref)
                state = JointState(name=names, position=q, velocity=[0.0] * len(q))
                state.header.stamp = stamp
                states.publish(state)
                published += 1
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        rclpy.try_shutdown(context=context)
    reader.join(timeout=5)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert published > 50, out
    assert bag_is_complete(bag), out
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    counts = {t["topic_metadata"]["name"]: t["message_count"]
              for t in info["topics_with_message_count"]}
    assert set(counts) == {"/robot/joint_states", "/effort_controller/commands", "/reference",
                           "/onnx_policy_node/latent", "/diagnostics"}, out
    print(f"published {published} states/references; recorded {counts}")
    # what was published (a few messages may precede the match or follow the bag's close at
    # the end of --duration), and commands from the control loop
    assert counts["/robot/joint_states"] >= published - 5, (counts, published)
    assert counts["/reference"] >= published - 5, (counts, published)
    assert counts["/effort_controller/commands"] > 20, (counts, out)
    assert counts["/diagnostics"] > 0 and counts["/onnx_policy_node/latent"] > 0, counts
    assert "Traceback" not in out


# ------------------------------------------------------------------------------ required nodes


@pytest.mark.parametrize("name,count", [("adapt_sim", 3), ("deploy", 2)])
def test_a_required_node_exit_ends_either_launch_file_with_an_error(monkeypatch, name, count):
    """Each node's on_exit raises while the launch runs (ros2 launch then shuts the others
    down and exits 1) and stays quiet once the launch is shutting down (Ctrl-C)."""
    from metarl_ros.graph.launch_description import RequiredNodeError
    from metarl_ros.graph.spec import GRAPHS

    declared, _ = GRAPHS[name]
    values = {arg.name: arg.default for arg in declared}
    values.update(record="true", bag="/data/run3")
    description = stand_in_launch_description(monkeypatch, name, values)
    opaque = [a for a in description if type(a).__name__ == "OpaqueFunction"][0]
    nodes = [a for a in opaque.kwargs["function"](values) if type(a).__name__ == "Node"]
    assert len(nodes) == count  # recorder_node included: record:=true must not run unrecorded
    for node in nodes:
        on_exit = node.kwargs["on_exit"]
        running = types.SimpleNamespace(is_shutdown=False)
        with pytest.raises(RequiredNodeError,
                           match=f"required node {node.kwargs['name']} exited with code 1"):
            on_exit(types.SimpleNamespace(returncode=1), running)
        with pytest.raises(RequiredNodeError, match="code 0"):
            on_exit(types.SimpleNamespace(returncode=0), running)  # an exit is a failure too
        assert on_exit(types.SimpleNamespace(returncode=-2),
                       types.SimpleNamespace(is_shutdown=True)) is None


def _failing_physics(monkeypatch, after: int) -> None:
    from metarl_ros.sim import arm_sim

    step, calls = arm_sim.ArmSimulation.step, [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("physics exploded")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(arm_sim.ArmSimulation, "step", failing)


def test_metarl_launch_ends_with_an_error_when_a_required_node_fails(monkeypatch, capsys):
    """sim_node's simulation thread dies mid-run: the graph ends at once with status 1,
    naming the node, instead of running on (or waiting for a duration never reached)."""
    from metarl_ros.graph.runner import run_graph

    monkeypatch.setenv("ROS_DOMAIN_ID", str(_domain()))
    _failing_physics(monkeypatch, after=30)
    stop = threading.Event()  # a bound for this test only: the graph must not need it
    timer = threading.Timer(30.0, stop.set)
    timer.start()
    try:
        report = run_graph(adapt_sim_graph({"real_time_factor": "0.0"}), duration_s=60.0,
                           stop=stop)
    finally:
        timer.cancel()
    assert report.code == 1 and not stop.is_set()
    err = capsys.readouterr().err
    assert "required node sim_node failed: simulation loop crashed: RuntimeError: physics " \
           "exploded" in err
    assert "Traceback" not in err


def test_a_node_process_whose_simulation_fails_exits_1():
    """As its own process (ros2 run, ros2 launch) the failed sim_node exits 1, which is what
    the launch files' on_exit handlers see."""
    code = textwrap.dedent("""
        import sys
        from metarl_ros.sim import arm_sim
        step, calls = arm_sim.ArmSimulation.step, [0]
        def failing(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > 30:
                raise RuntimeError("physics exploded")
            return step(self, *args, **kwargs)
        arm_sim.ArmSimulation.step = failing
        from metarl_ros.nodes.sim_node import main
        sys.exit(main(["--ros-args", "-p", "real_time_factor:=100.0",
                       "-p", "wait_for_controller:=false"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "simulation loop crashed: RuntimeError: physics exploded" in out
