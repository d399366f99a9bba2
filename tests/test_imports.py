"""The import graph holds the layers kernels < runtime < exporters < benchmarks: no module imports from a higher
layer, counting imports inside functions too (a lazy import that dodges a cycle is still an upward edge), and there
are no cycles within a layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# repository folder -> installed module prefix (pyproject's package-dir), lowest layer first
FOLDERS = {
    "runtime/kernels": "shira_runtime.kernels",
    "runtime": "shira_runtime",
    "exporters": "shira_runtime.exporters",
    "benchmarks": "benchmarks",
}
LAYERS = ("shira_runtime.kernels", "shira_runtime", "shira_runtime.exporters", "benchmarks")


def layer(module: str) -> int:
    """Index in LAYERS of the longest prefix that owns ``module``."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS.index(best)


def module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder, prefix in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((prefix, *rel)).removesuffix(".__init__")
            files.setdefault(name, f)  # runtime/kernels/* is claimed by its own prefix first
    return files


def module_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                subs = {f"{base}.{a.name}" for a in node.names}
                found |= {s for s in subs if s in files} or {base}  # `from pkg import submodule` skips pkg
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_checkers_find_a_cycle_and_an_upward_edge():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = {"shira_runtime.kernels.x": {"shira_runtime.manager"}, "shira_runtime.manager": {"shira_runtime.kernels.x"}}
    assert upward_edges(graph) == ["shira_runtime.kernels.x -> shira_runtime.manager"]
    assert layer("shira_runtime.exporters.package") == 2 and layer("shira_runtime.kernels") == 0
    assert layer("shira_runtime.manager") == 1 and layer("benchmarks.switch_latency") == 3


def test_the_graph_sees_the_whole_project():
    graph = module_graph()
    assert "shira_runtime.shira_file" in graph["shira_runtime.adapters"]
    assert "shira_runtime.kernels.reference" in graph and "shira_runtime.exporters.package" in graph
    assert any(m.startswith("shira_runtime.kernels") for m in graph["shira_runtime.switcher"])


def test_layers_kernels_runtime_exporters_benchmarks():
    edges = upward_edges(module_graph())
    assert not edges, "imports from a higher layer:\n" + "\n".join(edges)


def test_no_import_cycles():
    cycle = find_cycle(module_graph())
    assert cycle is None, " -> ".join(cycle)
