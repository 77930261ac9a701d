"""The library's import graph (pipeline/, refseg_models/), read with ``ast``: no import circle, also
counting imports inside functions (a function-level import must not be a way to dodge a cycle), and
the models never import the pipeline (docs/architecture.md)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "refseg_models")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    """{module: refseg modules it imports anywhere (module or function level), with their parent packages}."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for imported in _imported_names(node, name, path.name == "__init__.py"):
                parts = imported.split(".")
                for k in range(1, len(parts) + 1):  # `import a.b.c` runs a, a.b and a.b.c
                    target = ".".join(parts[:k])
                    if target in modules and target != name and not name.startswith(target + "."):
                        graph[name].add(target)
    return graph


def test_no_import_circle_even_through_function_level_imports():
    try:
        tuple(TopologicalSorter(import_graph()).static_order())
    except CycleError as error:
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None


def test_the_models_never_import_the_pipeline():
    offending = {m: sorted(t for t in targets if t.startswith("pipeline")) for m, targets in import_graph().items()
                 if m.startswith("refseg_models")}
    assert not {m: t for m, t in offending.items() if t}
