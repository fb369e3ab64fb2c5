"""The rules of ARCHITECTURE.md, checked on the import graph of the package (read from the source, not run)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "ibllm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """ibllm module -> the ibllm modules it imports at module level (imports inside functions are listed too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of ideas; everything else must be acyclic.
    strict = {m: {d for d in deps if not (m.startswith(d + ".") and graph.get(d) is not None)}
              for m, deps in graph.items()}
    for module in strict:
        cycle = {d for d in _reaches(strict, module) if module in _reaches(strict, d)}
        assert not cycle, f"{module} is in an import cycle with {sorted(cycle)}"


def test_layers_import_only_downwards():
    graph = import_graph()
    engine_side = _reaches(graph, "ibllm.engine") | _reaches(graph, "ibllm.factory") | {"ibllm.engine"}
    assert not {m for m in engine_side if m.startswith(("ibllm.ui", "ibllm.train"))}, "the engine imports UI/training"
    for module, deps in graph.items():
        if module.startswith(("ibllm.encoders", "ibllm.media")):
            assert not {d for d in deps if d.startswith(("ibllm.llm", "ibllm.engine", "ibllm.ui"))}, module
        if module.startswith("ibllm.llm"):
            assert not {d for d in deps if d.startswith(("ibllm.encoders", "ibllm.media", "ibllm.engine"))}, module


def test_imports_are_at_the_top():
    """Imports inside functions need a reason written next to them (a comment on the line or the line above)."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        here, above = lines[inner.lineno - 1], lines[inner.lineno - 2]
                        if "#" not in here and not above.strip().startswith("#"):
                            unexplained.append(f"{path.relative_to(REPO)}:{inner.lineno}")
    assert not unexplained, f"imports inside functions without a reason: {unexplained}"
