"""The package's layering, checked on the source: dependencies point one way, no cycles.

Every ``import`` counts, including those inside functions (a lazy import is still a
dependency). Subpackages are ordered bottom to top as in ``metarl_ros/__init__.py``; a module
may import its own subpackage and the ones below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metarl_ros"

LAYERS = ("core", "control", "sim", "recording", "learning", "policy", "evaluation",
          "distributed", "nodes", "graph", "demo", "cli")
"""Bottom to top."""

ROS_FREE = ("core", "control", "sim", "recording", "learning", "policy", "evaluation",
            "distributed")
"""Subpackages that must run without ROS 2 (no rclpy, launch or message packages)."""

ROS_MODULES = ("rclpy", "launch", "launch_ros", "builtin_interfaces",
               "sensor_msgs", "std_msgs", "trajectory_msgs", "geometry_msgs", "diagnostic_msgs",
               "rosgraph_msgs", "rcl_interfaces")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from pkg import submodule`` depends on the submodule
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def internal_edges() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_subpackage_has_a_layer_and_a_docstring():
    for sub in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        assert sub.name in LAYERS, f"subpackage {sub.name} is not in LAYERS"
        doc = ast.get_docstring(ast.parse((sub / "__init__.py").read_text()))
        assert doc, f"metarl_ros/{sub.name}/__init__.py has no docstring"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside a subpackage: {loose}"


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in internal_edges().items():
        own = layer_of(module)
        if own is None:
            continue
        for target in targets:
            other = layer_of(target)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports against the layering:\n" + "\n".join(sorted(upward))


def test_the_core_never_imports_ros():
    offenders = []
    for name, path in source_modules().items():
        if layer_of(name) in ROS_FREE:
            ros = sorted(m for m in imports_of(path) if m.split(".")[0] in ROS_MODULES)
            if ros:
                offenders.append(f"{name}: {', '.join(ros)}")
    assert offenders == [], "ROS imports in the ROS-free core:\n" + "\n".join(offenders)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph ``edges`` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(internal_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a"}}, True),
])
def test_the_cycle_finder_finds_cycles(edges, cyclic):
    assert (find_cycle(edges) is not None) == cyclic


def test_the_layer_check_sees_relative_and_lazy_imports(tmp_path):
    module = PACKAGE / "control" / "controller.py"
    imported = imports_of(module)
    assert "metarl_ros.control.law" in imported
    assert layer_of("metarl_ros.control.law") == "control"
    assert layer_of("metarl_ros") is None
