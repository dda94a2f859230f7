"""The package's shape: a folder per stage, no import cycles, short modules, docstring-only package fronts.

These read the source (no imports executed), so they fail on the commit that breaks the shape, not later.
"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cxrage_ray"
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 10


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports, counting imports inside functions and TYPE_CHECKING blocks."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("cxrage_ray") else None
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(import_graph(_modules())) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_at_most_ten_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_config_and_contract_are_leaves():
    graph = import_graph(_modules())
    assert graph.get("cxrage_ray.config", set()) <= {"cxrage_ray.errors"}
    assert graph.get("cxrage_ray.contract", set()) <= {"cxrage_ray.errors"}
    assert graph.get("cxrage_ray.errors", set()) == set()


def test_every_stage_folder_says_what_goes_in_and_out_and_imports_nothing():
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        where = init.relative_to(REPO)
        assert doc and len(doc.splitlines()) >= 2, f"{where}: a docstring saying what goes in and out"
        if init.parent != PACKAGE:
            assert all(isinstance(node, ast.Expr) for node in tree.body), f"{where}: a docstring only, no imports"


def test_every_package_is_listed_for_installation():
    """pyproject.toml lists the packages explicitly (for `cxrage_ray.weights_data`): a new folder must be in it, or a
    non-editable install would lack it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed and listed - on_disk == {"cxrage_ray.weights_data"}
