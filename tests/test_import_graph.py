"""The data flows one way: the import graph of pipeline/, student/, schemas/ and bench/ has no circle, and no
layer imports one above it (schemas imports neither side, pipeline never the student).

The graph is read from the source with `ast`, so it holds every import: at the top of a module and inside a
function alike (a lazy import still ties the two modules together). Imports under `if TYPE_CHECKING:` are left
out: they name types for annotations and never run. bench/ scripts import each other by bare name (`import
quality_runs`, with bench/ on sys.path), so a bare name that is a bench script is that script.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "student")
# layer -> the layers it may not import
FORBIDDEN = {"schemas": ("pipeline", "student", "bench"), "pipeline": ("student", "bench"), "student": ("bench",)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the packages and of bench/."""
    found = {}
    for top in (*PACKAGES, "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """The dotted names a module imports (for `from a import b`: a.b, then a if a.b is no module)."""
    names, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names] + [base]
        todo.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of this repository it imports."""
    known = modules()
    bench_scripts = {name.split(".", 1)[1]: name for name in known if name.startswith("bench.")}
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for target in _imported_names(ast.parse(path.read_text(), str(path)), package):
            if name.startswith("bench.") and target.split(".")[0] in bench_scripts:
                target = bench_scripts[target.split(".")[0]]
            # `from a import b`: the module a.b if there is one, else a (b is a name defined in a)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def test_no_layer_imports_one_above_it():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in sorted(targets)
              if _layer(b) in FORBIDDEN.get(_layer(a), ())]
    assert upward == []


def test_the_checker_sees_lazy_imports_and_circles():
    """A circle made only of imports inside functions is still found; a TYPE_CHECKING import is not an edge."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from student.config import X\n"
                     "def f():\n    from student.loop import run_loop\n")
    names = _imported_names(tree, "student")
    assert "student.loop.run_loop" in names and not any(n.startswith("student.config") for n in names)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "student.config" in graph["student.train"] and "pipeline.store.reader" in graph["student.train"]
