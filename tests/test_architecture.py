"""The package's shape: imports go downward only (no cycles, lazy imports included), and no
module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "drafteu"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)} over every import statement,
    including those inside functions."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drafteu"):
                found |= {(node.module, a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {(a.name, None) for a in node.names if a.name.startswith("drafteu")}
        out[_module(path)] = found
    return out


def test_no_import_cycles():
    imports = _imports()
    graph = {}
    for mod, found in imports.items():
        deps = set()
        for target, name in found:
            sub = f"{target}.{name}" if name else None
            deps.add(sub if sub in imports else target)  # `from drafteu import models` is drafteu.models
        graph[mod] = {d for d in deps if d in imports and d != mod and d != "drafteu"}
    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles: " + "; ".join(cycles)
    # the graph is real (lazy imports counted): the orchestrator sits on top of what it runs, and
    # only the CLI imports it
    assert {"drafteu.evaluate.stages", "drafteu.evaluate.scoring", "drafteu.rundir"} <= graph["drafteu.pipeline"]
    assert [m for m, deps in graph.items() if "drafteu.pipeline" in deps] == ["drafteu.cli"]


def test_no_private_names_across_modules():
    bad = [f"{mod} imports {target}.{name}" for mod, found in _imports().items() for target, name in found
           if name and name.startswith("_") and not name.startswith("__") and target != mod]
    assert not bad, bad


def test_the_registries_name_the_methods():
    """No draft method or estimator name is written as a literal in the evaluation stages or the report:
    they ask drafteu.methods by role, so a new method needs a registry entry and nothing else."""
    from drafteu.methods import DRAFT_METHODS, ESTIMATORS

    names = set(DRAFT_METHODS) | set(ESTIMATORS)
    found = []
    for rel in ("evaluate/stages.py", "report.py"):
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, found
