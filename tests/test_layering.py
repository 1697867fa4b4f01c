"""The package's layering: no import cycles, and no module imports a higher layer (imports inside functions count too);
every sub-package says in one line what it holds.

Layers, lowest first: base (errors, config, console output, packaged files, the version), data, evidence (metrics and
the measurements the ladder is built from: it runs any model it is handed), models, training, store (registry, lineage),
serving (predictors for finished runs, the HTTP server), tasks (one adapter per task kind), the runner (what every task
kind shares), and the entry points (CLI, Python API). A module's layer is its sub-package's.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "fmtune"

BASE = {"fmtune.version", "fmtune.errors", "fmtune.config", "fmtune.console", "fmtune.packages"}
ENTRY = {"fmtune", "fmtune.cli", "fmtune.api", "fmtune.__main__"}  # the package root is the API's facade (fmtune.run, fmtune.load)
ORDER = ["base", "data", "evidence", "models", "training", "store", "serving", "tasks", "runner", "entry"]
SUBPACKAGES = ORDER[1:-1]


def module_name(path: Path) -> str:
    parts = ["fmtune", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every fmtune module `path` imports, at the top or inside a function ('from fmtune import x' names x if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fmtune"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fmtune" and node.level == 0:
            for alias in node.names:  # `from fmtune import audit` imports the module fmtune.data.audit, not the package's API
                sub = SRC.parent / f"{node.module}.{alias.name}".replace(".", "/")
                found.add(f"{node.module}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in SRC.rglob("*.py")}


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module in ENTRY:
        return ORDER.index("entry")
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in SUBPACKAGES:
        return ORDER.index(parts[1])
    raise AssertionError(f"{module} is in no layer: put it in a sub-package ({', '.join(SUBPACKAGES)}) or add it to BASE/ENTRY in tests/test_layering.py")


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)


def test_no_module_imports_a_higher_layer():
    wrong = [f"{m} ({ORDER[layer(m)]}) imports {d} ({ORDER[layer(d)]})" for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_every_sub_package_says_what_it_holds_in_one_line():
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((SRC / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "\n" not in doc.strip(), f"fmtune/{name}/__init__.py needs a one-line docstring"
