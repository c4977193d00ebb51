"""The package's shape: every import points down the layers of ``shared/design.md``, and no module
imports another that (directly or not) imports it back.

Imports are read from the source with ``ast`` (module-level and function-level alike, since a
lazy import inside a function is still a dependency), so the check covers code no test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# From the ground up; a module may import its own layer and the ones before it.
LAYERS: list[tuple[str, ...]] = [
    ("s2d.errors", "s2d.allocator", "s2d.checkpoint", "s2d.runs", "s2d.data", "s2d.distributed", "s2d"),
    ("s2d.models",),
    ("s2d.transform",),
    ("s2d.measure",),
    ("s2d.training",),
    ("s2d.search.space", "s2d.search.archive", "s2d.search.evaluator"),
    ("envs",),
    ("s2d.search",),
    ("s2d.pipeline",),
    ("s2d.cli", "s2d.__main__"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("s2d", "envs"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    """The most specific matching prefix wins (``s2d.search.space`` before ``s2d.search``)."""
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = [m for m in GRAPH[module] if layer_of(m) > layer_of(module) and not module.startswith(m + ".")]
    assert not up, f"{module} (layer {layer_of(module)}) imports from higher layers: {up}"


def test_no_import_cycles():
    """Tarjan-free: depth-first search with colours; a back edge is a cycle."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a package and its own submodules (``__init__`` re-exports)
            if colour.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in colour:
                visit(n)
        stack.pop()
        colour[m] = 2

    for m in sorted(GRAPH):
        if m not in colour:
            visit(m)


def test_the_checker_sees_real_edges():
    """The checks above must be able to fail: known downward edges are found."""
    assert "s2d.transform.supernet" in GRAPH["s2d.search.evaluator"]
    assert "s2d.search.space" in GRAPH["envs.multistage"]
    assert layer_of("s2d.search.runner") > layer_of("envs.multistage") > layer_of("s2d.search.space")
