"""The package's layering, read from its imports (ast, nothing is imported or run).

No two packages of flair_fl import each other, directly or through others: a cycle means
neither can be read, tested or replaced alone. Lazy imports inside functions count too:
they hide a cycle, they do not remove it. Type-only imports (`if TYPE_CHECKING:`) do not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flair_fl"
# Imports that would undo the separation, beyond cycles: (importer, imported) packages.
FORBIDDEN = {
    (
        "privacy",
        "federated",
    ): "privacy is a stage of the round: it knows the protocol, not the loop",
    ("algorithms", "federated"): "an algorithm knows the protocol, not the loop",
    ("artifacts", "federated"): "run outputs know nothing of the round loop",
    ("artifacts", "algorithms"): "checkpoints hold strategy state through the contract",
    ("learning", "federated"): "training math knows nothing of Flower's round",
    ("data", "federated"): "data knows nothing of Flower",
    ("models", "data"): "models know nothing of data",
}
ALLOWED_MODULES = {("privacy", "federated"): {"flair_fl.protocol"}}


def _unit(module: str) -> str:
    """The package (or top-level module) a dotted flair_fl module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str) -> Iterator[str]:
    """Every module `tree` imports, at any depth, except under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for other in node.orelse:
                yield from _imports(other, module)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)
        yield from _imports(node, module)


def import_graph() -> dict[str, set[str]]:
    """flair_fl module -> the flair_fl modules it imports."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {m for m in _imports(tree, name) if m in modules and m != name}
    return graph


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (more than one package) of the package graph."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            if _unit(module) != _unit(target):
                edges.setdefault(_unit(module), set()).add(_unit(target))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted({_unit(m) for m in graph}):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_packages() -> None:
    graph = import_graph()
    cycles = package_cycles(graph)
    detail = [
        f"{m} -> {t}"
        for cycle in cycles
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if _unit(m) in cycle and _unit(t) in cycle and _unit(m) != _unit(t)
    ]
    assert not cycles, f"package cycles {cycles}:\n" + "\n".join(detail)


@pytest.mark.parametrize(("importer", "imported"), sorted(FORBIDDEN))
def test_layering(importer: str, imported: str) -> None:
    allowed = ALLOWED_MODULES.get((importer, imported), set())
    bad = [
        f"{m} -> {t}"
        for m, targets in sorted(import_graph().items())
        for t in sorted(targets)
        if _unit(m) == importer and _unit(t) == imported and t not in allowed
    ]
    assert not bad, f"{FORBIDDEN[importer, imported]}:\n" + "\n".join(bad)


def test_type_only_imports_do_not_count() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flair_fl.a\n"
    source += "def f():\n    import flair_fl.b\n"
    assert set(_imports(ast.parse(source), "flair_fl.x")) == {
        "typing",
        "typing.TYPE_CHECKING",
        "flair_fl.b",
    }


def test_the_checker_sees_a_cycle() -> None:
    graph = {
        "flair_fl.a.x": {"flair_fl.b.y"},
        "flair_fl.b.y": {"flair_fl.a.z"},
        "flair_fl.a.z": set(),
    }
    assert package_cycles(graph) == [["a", "b"]]
    assert package_cycles({"flair_fl.a.x": {"flair_fl.b.y"}, "flair_fl.b.y": set()}) == []
