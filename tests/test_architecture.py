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
    assert {"drafteu.evaluate.stages", "drafteu.evaluate.scoring_stage", "drafteu.rundir"} <= graph["drafteu.pipeline"]
    assert [m for m, deps in graph.items() if "drafteu.pipeline" in deps] == ["drafteu.cli"]


def test_no_private_names_across_modules():
    bad = [f"{mod} imports {target}.{name}" for mod, found in _imports().items() for target, name in found
           if name and name.startswith("_") and not name.startswith("__") and target != mod]
    assert not bad, bad


def _estimator_classes_named(tree: ast.AST, classes: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every use of an estimator class in ``tree``: a call, an ``isinstance``, an attribute."""
    return [(n.lineno, n.id if isinstance(n, ast.Name) else n.attr) for n in ast.walk(tree)
            if (isinstance(n, ast.Name) and n.id in classes) or (isinstance(n, ast.Attribute) and n.attr in classes)]


def test_estimators_are_built_through_the_registry_only():
    """Outside estimators.py no module names an estimator class (no constructor call, no ``isinstance``):
    each caller fills one ``BuildContext`` and its registry entry builds the estimator, and what a method
    costs is its estimator's ``passes()``."""
    from drafteu.methods import ESTIMATORS

    classes = {e.component.rpartition(":")[2] for e in ESTIMATORS.values()}
    found = [f"{path.relative_to(PACKAGE)}:{line} {name}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "estimators.py"
             for line, name in _estimator_classes_named(ast.parse(path.read_text(encoding="utf-8")), classes)]
    assert not found, found
    assert classes == {"GroundTruth", "TokUR", "PredictiveEntropy", "DraftEnsemble"}
    code = "x = estimators.DraftEnsemble(d, t)\nif isinstance(e, TokUR):\n    pass\n"
    assert [n for _, n in _estimator_classes_named(ast.parse(code), classes)] == ["DraftEnsemble", "TokUR"]


def _name_literals(tree: ast.AST, registered: dict[str, str]):
    """(line, string) of every string literal of ``tree`` except docstrings, ``__all__`` and a class's
    ``name = "x"`` where the registry's component for "x" is that class (``registered``: name -> class)."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip |= {id(n) for n in ast.walk(node.value)}
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.Assign) and [getattr(t, "id", None) for t in item.targets] == ["name"]
                        and isinstance(item.value, ast.Constant) and registered.get(item.value.value) == node.name):
                    skip.add(id(item.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def _registered() -> tuple[set[str], dict[str, str]]:
    """The draft-method and estimator names the scan looks for (a stage's name, "drafts", is also an
    estimator's and a run folder's, so that literal cannot be told apart and is left out), and each
    estimator's class as its registry entry names it."""
    from drafteu.methods import DRAFT_METHODS, ESTIMATORS
    from drafteu.pipeline import STAGES

    names = (set(DRAFT_METHODS) | set(ESTIMATORS)) - {s.name for s in STAGES}
    return names, {n: e.component.rpartition(":")[2] for n, e in ESTIMATORS.items()}


def test_no_module_names_a_method_outside_the_registry():
    """Over the whole package, no string literal is a draft method's or an estimator's name outside
    methods.py (an estimator's class may state its own name): every caller asks the registry, so adding
    one is its entry plus its implementation (docs/architecture.md, "How to add ...")."""
    names, registered = _registered()
    found = [f"{path.relative_to(PACKAGE)}:{line} {value!r}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "methods.py"
             for line, value in _name_literals(ast.parse(path.read_text(encoding="utf-8")), registered)
             if value in names]
    assert not found, found
    assert {"groundtruth", "tokur", "entropy", "ddd", "konly", "gkd"} <= names  # the check is about real names


def test_the_scan_finds_a_name_written_anywhere():
    """The scan above can fail: a comparison, a membership, a dict key, an argument and a default are
    found; a docstring, ``__all__`` and the registered class's own name are not, another class's is."""
    names, registered = _registered()
    code = ('__all__ = ["entropy"]\n'
            'def f(m, k="idd"):\n    "ddd docstring"\n    if m == "tokur" or m in ("gkd", "x"):\n        return '
            '{"fdd": g("konly")}\nclass TokUR:\n    name = "tokur"\nclass Other:\n    name = "groundtruth"\n')
    found = sorted(v for _, v in _name_literals(ast.parse(code), registered) if v in names)
    assert found == ["fdd", "gkd", "groundtruth", "idd", "konly", "tokur"]


def test_no_module_branches_on_a_draft_base_kind():
    """Over the whole package, no comparison names a draft-base kind outside draft_base_kinds.py (a manifest
    or recipe field and the CLI's nested "quantize" section may still write the word): the pipeline,
    preflight, the run directory, the report and the builder ask the entry."""
    from drafteu.draft_base_kinds import KINDS

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "draft_base_kinds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            sides = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
            for side in sides:
                for n in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]):
                    if isinstance(n, ast.Constant) and n.value in KINDS:
                        found.append(f"{path.relative_to(PACKAGE)}:{n.lineno} {n.value!r}")
    assert not found, found
    assert set(KINDS) == {"truncate", "quantize"}


def test_every_generation_backend_is_built_and_called_alike():
    """Each BACKENDS entry has the GenerationBackend protocol's members and one constructor shape, so
    generate, serve and the pipeline never ask which backend they hold."""
    import inspect

    from drafteu.generate import BACKENDS, GenerationBackend

    members = {n for n in vars(GenerationBackend) if not n.startswith("_")} | set(GenerationBackend.__annotations__)
    assert {"generate", "close", "require", "owns_weights", "chunk"} <= members
    shapes = set()
    for name, cls in BACKENDS.items():
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, f"{name}: {missing}"
        assert isinstance(cls.owns_weights, bool) and cls.chunk >= 1
        shapes.add(tuple(inspect.signature(cls.__init__).parameters))
    assert len(shapes) == 1, shapes
    BACKENDS["hf"].require(cheap=True)  # transformers is a dependency


def test_the_code_passes_ruff_at_the_width_it_uses():
    """ruff's rules from pyproject.toml (E501 included: lines of at most 120 characters) over the
    package, the tests, the benchmarks and the examples: `make lint` as a test, so CI enforces it."""
    import shutil
    import subprocess
    import sys

    import pytest

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the dev extra: make setup installs it)")
    root = PACKAGE.parent
    out = subprocess.run([ruff, "check", "--no-cache", "drafteu", "tests", "bench", "examples"], cwd=root,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
