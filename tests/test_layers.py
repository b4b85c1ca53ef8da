"""The package's layers, read from its imports (ast): what may import what, no cycle, no path edits.

From the bottom up: ``soup/`` (standard library and torch only), the torch /
open_clip modules (never Ray), ``cluster/`` (every Ray edge), ``serving/``,
``bench/``, then ``jobs`` and ``cli``. Nothing in the package imports the
repository's ``serve/`` entry or edits ``sys.path`` / ``PYTHONPATH``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "soup_ray"

# rank of each room: a module may import rooms of its own rank or below, never above
RANKS = {"soup": 0, "core": 1, "cluster": 2, "serving": 3, "bench": 4, "jobs": 5, "cli": 6}
RAY_ROOMS = {"cluster", "serving", "bench", "jobs", "cli"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    """soup_ray.soup.greedy -> soup; soup_ray.model -> core; soup_ray.jobs -> jobs."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    first = parts[1]
    if first in RANKS:
        return first
    return "core"


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module an import statement names (at any depth, lazy imports included), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
                    continue
            else:
                target = node.module or ""
            out.append((target, node.lineno))
    return out


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def resolve(target: str, known: set[str]) -> str | None:
    """The package module an import lands in (``soup_ray.soup.Candidate`` -> ``soup_ray.soup``)."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def test_the_package_has_the_layered_rooms() -> None:
    for folder in ("soup", "cluster", "serving", "bench"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    for module in ("run_dir.py", "jobs.py", "cli.py", "config.py"):
        assert (PACKAGE / module).is_file(), module


def test_soup_imports_only_the_standard_library_and_torch() -> None:
    bad = []
    for path in sorted((PACKAGE / "soup").rglob("*.py")):
        for target, line in imports_of(path):
            top = target.split(".")[0]
            if target.startswith("soup_ray.soup") or top in sys.stdlib_module_names or top == "torch":
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_ray_only_at_the_edges() -> None:
    bad = []
    for path in package_files():
        mod = module_name(path)
        if room(mod) in RAY_ROOMS:
            continue
        for target, line in imports_of(path):
            if target.split(".")[0] == "ray":
                bad.append(
                    f"{path.relative_to(ROOT)}:{line} imports {target} (only cluster/, serving/, bench/, "
                    "jobs and cli may)"
                )
    assert not bad, "\n".join(bad)


FACADE = "soup_ray"
"""``soup_ray/__init__.py``, the public API (``run``, ``soup``, ``load_soup``): the one module allowed to reach a
room above its own (the pipelines in ``jobs``, the server's image decoding), and only with imports inside its
functions, so ``import soup_ray`` stays light and no module of the package is pulled in by importing it."""


def lazy_import_lines(path: Path) -> set[int]:
    """The lines of the import statements that sit inside a function body."""
    tree = ast.parse(path.read_text(), str(path))
    lines: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def test_no_module_imports_a_room_above_its_own() -> None:
    known = {module_name(p) for p in package_files()}
    bad = []
    for path in package_files():
        mod = module_name(path)
        lazy = lazy_import_lines(path) if mod == FACADE else set()
        for target, line in imports_of(path):
            if line in lazy:
                continue  # the facade's calls import what they use, when they are called
            if not target.startswith("soup_ray"):
                continue
            dest = resolve(target, known)
            if dest is None:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}, which does not exist")
                continue
            if RANKS[room(dest)] > RANKS[room(mod)]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room(mod)}) imports {dest} ({room(dest)})")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle() -> None:
    known = {module_name(p) for p in package_files()}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for path in package_files():
        mod = module_name(path)
        for target, _ in imports_of(path):
            dest = resolve(target, known) if target.startswith("soup_ray") else None
            # a package's __init__ re-exports its own modules: an edge into the package is an edge to them
            if dest is not None and dest != mod and not mod.startswith(dest + "."):
                graph[mod].add(dest)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_package_never_imports_the_serve_entry_nor_edits_the_path() -> None:
    bad = []
    for path in package_files() + sorted((ROOT / "serve").glob("*.py")):
        text = path.read_text()
        for target, line in imports_of(path):
            if target.split(".")[0] == "serve":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} touches sys.path")
            if isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} sets PYTHONPATH")
    assert not bad, "\n".join(bad)


def test_tests_use_public_names_and_no_file_paths_as_modules() -> None:
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("soup_ray"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports private {private}")
            if isinstance(node, ast.Attribute) and node.attr == "spec_from_file_location":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports a file by path")
    assert not bad, "\n".join(bad)
