"""The package's import graph: no cycle, commands at the edge, no argparse on the hot path.

The graph is read from the source with `ast`, so a cycle is found even when
the order modules happen to be imported in would hide it. Every import of a
`consumer` module counts, at module level and inside functions alike: a lazy
import still runs, and one that closes a loop only moves the failure (a
partially initialised module) to whichever call comes first. Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "consumer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node` that runs, at any depth."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _imports(other)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _imports(child)


def imported(name: str) -> set[str]:
    """The `consumer` modules that module `name` imports (an imported name that is a
    submodule counts as that submodule)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.add(sub if sub in modules() else base)
    return {m for m in found if m in modules() and m != name}


@cache
def graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(imported(name)) for name in modules()}


def find_cycle(edges: dict[str, frozenset[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph()[node])
    return seen


def test_the_graph_is_read() -> None:
    """The parser sees the edges the package is known to have (a guard for the tests below)."""
    edges = graph()
    assert "consumer.commands.dlq" in edges["consumer.cli"]
    assert "consumer.deadletter" in edges["consumer.commands.dlq"]
    assert "consumer.sandbox.server" in edges["consumer.sandbox"]
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"a"})}) == ["a", "b", "a"]


def test_no_import_cycle() -> None:
    """No module imports, however indirectly or lazily, a module that imports it."""
    assert find_cycle(graph()) is None


def test_commands_sit_at_the_edge() -> None:
    """Nothing imports `cli`; only `cli` imports `consumer.commands`; commands stay apart."""
    for name, targets in graph().items():
        assert "consumer.cli" not in targets or name == "consumer.__main__", name
        commands = {t for t in targets if t.startswith("consumer.commands")}
        if name.startswith("consumer.commands"):
            assert commands <= {"consumer.commands"}, (name, commands)
        elif name != "consumer.cli":
            assert not commands, (name, commands)


@pytest.mark.parametrize("module", ["consumer.service", "consumer.pipeline"])
def test_the_hot_path_does_not_import_the_command_layer(module: str) -> None:
    """The service's import closure holds no command, no `cli` and no argparse user."""
    closure = reachable(module)
    assert not {m for m in closure if m.startswith("consumer.commands") or m == "consumer.cli"}
    for name in closure:
        tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
        stdlib = {
            alias.name if isinstance(node, ast.Import) else node.module
            for node in _imports(tree)
            for alias in node.names
        }
        assert "argparse" not in stdlib, name


#: run in a fresh interpreter: import the module, print who imported argparse first
_SPY = """
import sys
importers = []

class Spy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "argparse":
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")
            ):
                frame = frame.f_back
            importers.append(frame.f_globals.get("__name__") if frame else None)
        return None

sys.meta_path.insert(0, Spy)
import {module}
print(",".join(map(str, importers)))
"""


@pytest.mark.parametrize("module", ["consumer.service", "consumer.pipeline"])
def test_the_hot_path_does_not_load_argparse(module: str) -> None:
    """Importing the service in a fresh interpreter loads argparse from no `consumer` module.

    aiohttp's `web` module imports it (for `python -m aiohttp.web`); the health
    server needs `aiohttp.web`, so argparse is loaded, but by aiohttp alone.
    """
    done = subprocess.run(
        [sys.executable, "-c", _SPY.format(module=module)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    importers = [name for name in done.stdout.strip().split(",") if name]
    assert not [name for name in importers if name.startswith("consumer")], importers
    assert set(importers) <= {"aiohttp.web"}, importers
