"""The package's layering: no import cycles, and no module imports a higher layer (imports inside functions count too).

Layers, lowest first: base (errors, config, the package's version), the stage modules (data, models, training, evidence,
serving, store), the runner (what every task kind shares), the task pipelines, and the entry points (CLI, Python API).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "fmtune"

LAYERS = {
    "base": {"fmtune.version", "fmtune.errors", "fmtune.config"},
    "stages": {
        "fmtune.data", "fmtune.gen_data", "fmtune.audit", "fmtune.tokens", "fmtune.quickstart",  # data
        "fmtune.models", "fmtune.causal_lm", "fmtune.lm_classify",  # models
        "fmtune.train", "fmtune.loop", "fmtune.checkpoint", "fmtune.mixed_precision", "fmtune.fast_dropout", "fmtune.cpu_kernels", "fmtune.threads",
        "fmtune.distributed",  # training
        "fmtune.evaluate", "fmtune.baselines", "fmtune.retention", "fmtune.domain_shift", "fmtune.learning_curve", "fmtune.inference",
        "fmtune.gen_metrics", "fmtune.verdict",  # evidence
        "fmtune.predict", "fmtune.serve", "fmtune.report_html",  # serving and reports
        "fmtune.lineage", "fmtune.registry",  # store
        "fmtune.runner.console", "fmtune.runner.ladder",
    },
    "tasks": {"fmtune.tasks", "fmtune.tasks.base", "fmtune.tasks.causal", "fmtune.tasks.encoder", "fmtune.tasks.generation", "fmtune.tasks.lm_classification"},
    "runner": {"fmtune.runner", "fmtune.runner.folder", "fmtune.runner.report", "fmtune.runner.pipeline"},
    "entry": {"fmtune", "fmtune.cli", "fmtune.api", "fmtune.__main__", "fmtune.pipeline"},  # the package root is the API's facade (fmtune.run, fmtune.load)
}
ORDER = list(LAYERS)


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
            for alias in node.names:  # `from fmtune import audit` imports the module fmtune.audit, not the package's API
                sub = SRC.parent / f"{node.module}.{alias.name}".replace(".", "/")
                found.add(f"{node.module}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in SRC.rglob("*.py")}


def layer(module: str) -> int:
    for i, name in enumerate(ORDER):
        if module in LAYERS[name]:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


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
