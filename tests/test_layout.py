"""The package's architecture as a checked rule: imports go one way (privacy → methods → training →
{memory, audit, federated, single_site} → cli), no cycle among modules nor among the parts of one level,
and the library imports no Flower. Read from the sources (every import, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import dpmemarc_core

PACKAGE = Path(dpmemarc_core.__file__).resolve().parent
# Level of each top-level part of the package. Level 1 holds the shared utilities (models, data, losses,
# metrics, offline assets, a site's data file, the host's available RAM): used from methods upwards, above
# nothing but privacy.
LEVELS = {
    "privacy": 0,
    "offline": 1, "data": 1, "models": 1, "losses": 1, "metrics": 1, "site_data": 1, "pooling": 1,
    "host_memory": 1,
    "methods": 2,
    "training": 3,
    # The runs: the single-site run and a federated site fit their micro-batch with the memory planner.
    "memory": 4, "audit": 4, "federated": 4, "single_site": 4,
    "cli": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (`from package import module` resolved to the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_part_of_the_package_has_a_level():
    assert {part(m) for m in modules() if part(m)} <= set(LEVELS), "a new top-level module needs a level here"


def part_edges() -> set[tuple[str, str]]:
    known = set(modules())
    return {(part(name), part(target)) for name, path in modules().items() if part(name)
            for target in imported(path, known) if part(target) and part(target) != part(name)}


def test_imports_go_one_way():
    upward = sorted(f"{a} imports {b}" for a, b in part_edges() if LEVELS[b] > LEVELS[a])
    assert upward == []


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycles_among_modules_or_parts():
    known = set(modules())
    graph = {name: imported(path, known) - {name} for name, path in modules().items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    graph = {name: {t for t in targets if not (t.startswith(name + ".") and modules()[name].name == "__init__.py")}
             for name, targets in graph.items()}
    assert cycles_of(graph) == []
    parts: dict[str, set[str]] = {p: set() for p in LEVELS}
    for a, b in part_edges():
        parts[a].add(b)
    assert cycles_of(parts) == []


def test_the_library_imports_no_flower():
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        assert "import flwr" not in text and "from flwr" not in text, name
