"""No import cycles between the modules of ``modalseg`` (issue 14, item 8).

The graph is built statically from the source (AST), so a cycle is found even where today's import order
happens to avoid the ``ImportError``: every ``import x`` and ``from x import y`` at module or function level is
an edge (``y`` itself when it is a module, else ``x``); relative imports are resolved against their package.
Imports under ``if TYPE_CHECKING:`` never run, but a cycle through them still ties two modules together (each
needs the other to be read, type-checked or moved): the package is checked both ways, and has no cycle either way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "modalseg"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` (``pkg/__init__.py`` is ``pkg``)."""
    out: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, type_checking: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` except those in ``if TYPE_CHECKING:`` bodies (included with
    ``type_checking``)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``modalseg.x.func`` -> ``modalseg.x``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(modules: dict[str, Path], type_checking: bool = False) -> dict[str, set[str]]:
    """``{module: modules it imports}`` restricted to ``modules`` (``type_checking``: annotation-only imports too)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_imports(tree, type_checking):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the package holding this module, `level - 1` packages up
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                           for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every module of a
    component reaches every other one through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:  # recursion depth is bounded by the package's module count
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component, as a path ``[a, b, ..., a]`` of imports, so a failure
    message shows an import chain to break."""
    return [_cycle_through(comp, graph) for comp in strongly_connected(graph)]


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself (breadth first, inside it)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return component  # unreachable for a strongly connected component


# ------------------------------------------------------------------------------------------------ the checks
def test_graph_builder_resolves_relative_from_and_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n    return g\n")
    (pkg / "top.py").write_text(
        "from typing import TYPE_CHECKING\nimport pkg.sub.leaf as leaf\nfrom pkg.sub import leaf as again\n"
        "if TYPE_CHECKING:\n    from pkg import other\nelse:\n    import pkg.sub\n")
    (pkg / "other.py").write_text("from pkg.top import nothing_but_a_name\n")
    modules = module_files(tmp_path, "pkg")
    graph = import_graph(modules)
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}  # `from . import leaf` in a package: the submodule
    assert graph["pkg.sub.leaf"] == {"pkg.top"}  # function-level and two levels up
    assert graph["pkg.top"] == {"pkg.sub.leaf", "pkg.sub"}  # TYPE_CHECKING branch left out, its else kept
    assert graph["pkg.other"] == {"pkg.top"}  # a name imported from a module: the module
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1]
    assert set(cycles[0]) == {"pkg.sub", "pkg.sub.leaf", "pkg.top"}
    for a, b in zip(cycles[0], cycles[0][1:], strict=False):  # a real chain of imports
        assert b in graph[a]
    graph["pkg.sub.leaf"] = set()
    assert find_cycles(graph) == []
    assert import_graph(modules, type_checking=True)["pkg.top"] == {"pkg.sub.leaf", "pkg.sub", "pkg.other"}


def test_evaluation_stats_and_metrics_do_not_import_each_other() -> None:
    graph = import_graph(module_files())
    assert "modalseg.evaluation.metrics" not in graph["modalseg.evaluation.stats"]
    assert "modalseg.evaluation.metrics" not in graph["modalseg.evaluation.tables"]


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-hints"])
def test_no_import_cycles_in_modalseg(type_checking: bool) -> None:
    modules = module_files()
    assert len(modules) > 20, "package sources not found"
    graph = import_graph(modules, type_checking)
    lines = []
    for comp in strongly_connected(graph):
        cycle = _cycle_through(comp, graph)
        extra = "" if len(cycle) == len(comp) + 1 else f"   (cycle group of {len(comp)}: {', '.join(comp)})"
        lines.append(" -> ".join(cycle) + extra)
    if lines:
        shown = "\n".join(lines)
        print(f"import cycles:\n{shown}")
        pytest.fail(f"{len(lines)} import cycle(s) in {PACKAGE} (one chain per group of modules):\n{shown}")
