"""The package's shape (issue 13): no import circle among the sub-packages, no import of the
``preprocessing`` scripts, no reading of interpreter frames, and modules of a readable size.

Every module is parsed with ``ast`` (no import is executed), at module level AND inside
functions: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "monai_hsrdiff"
MODULES = sorted(PACKAGE.rglob("*.py"))
# the frame readers of the interpreter: attribute names, and the calls that fetch a frame
FRAME_ATTRIBUTES = {"f_locals", "f_back", "f_globals", "tb_frame"}
FRAME_CALLS = {("sys", "_getframe"), ("inspect", "currentframe"), ("inspect", "stack"), ("inspect", "getouterframes")}


def _unit(path: Path) -> str:
    """The sub-package (``data``, ``engines`` ...) or top-level module (``bundle``, ``errors`` ...) of a file."""
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imported(path: Path, tree: ast.AST) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    package = ["monai_hsrdiff", *path.relative_to(PACKAGE).parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            # `from . import x` / `from monai_hsrdiff import tasks`: the names may be sub-packages
            out += [(module, node.lineno)] + [(f"{module}.{a.name}", node.lineno) for a in node.names]
    return out


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]], list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    preprocessing = []
    units = {_unit(p) for p in MODULES}
    for path in MODULES:
        src = _unit(path)
        for module, line in _imported(path, ast.parse(path.read_text(encoding="utf-8"))):
            parts = module.split(".")
            if parts[0] == "preprocessing" and not any(p.startswith(f"{path.relative_to(REPO)}:{line} ") for p in preprocessing):
                preprocessing.append(f"{path.relative_to(REPO)}:{line} imports {module}")
            if parts[0] == "monai_hsrdiff" and len(parts) > 1 and parts[1] in units and parts[1] != src:
                edges[src].add(parts[1])
                if f"{path.relative_to(REPO)}:{line}" not in where[(src, parts[1])]:
                    where[(src, parts[1])].append(f"{path.relative_to(REPO)}:{line}")
    return edges, where, preprocessing


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each edge that lies on a circle (depth-first search from its head)."""
    found = []
    for a in sorted(edges):
        for b in sorted(edges[a]):
            stack, seen = [(b, [a, b])], {b}
            while stack:
                node, trail = stack.pop()
                if node == a:
                    found.append(trail)
                    break
                for nxt in sorted(edges.get(node, ())):
                    if nxt not in seen:
                        seen.add(nxt)
                        stack.append((nxt, [*trail, nxt]))
    return found


def test_graph_sees_deferred_and_relative_imports() -> None:
    """The parser finds a deferred relative import (guards the tests below against seeing nothing)."""
    tree = ast.parse("def f():\n    from ..errors import fail\n    import monai_hsrdiff.paths\n")
    names = [m for m, _ in _imported(PACKAGE / "engines" / "startup.py", tree)]
    assert "monai_hsrdiff.errors" in names and "monai_hsrdiff.paths" in names
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"]]
    assert len(MODULES) > 30


def test_no_import_circle_among_subpackages() -> None:
    edges, where, _ = _graph()
    circles = _cycles(edges)
    detail = [" -> ".join(c) + "  (" + "; ".join(where[(c[0], c[1])][:3]) + ")" for c in circles]
    assert not circles, "import circles:\n" + "\n".join(detail)


def test_library_never_imports_preprocessing() -> None:
    _, _, preprocessing = _graph()
    assert not preprocessing, "\n".join(preprocessing)


def _is_entry_point(tree: ast.Module) -> bool:
    """The module is a command line: it has an ``if __name__ == "__main__":`` block."""
    return any(
        isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        for node in tree.body
    )  # fmt: skip


def test_only_entry_points_import_the_bundle_helpers() -> None:
    """``monai_hsrdiff.bundle`` is the top: only the bundle configs and command lines call it."""
    users = []
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = [line for m, line in _imported(path, tree) if m == "monai_hsrdiff.bundle" or m.startswith("monai_hsrdiff.bundle.")]
        if lines and path.name != "bundle.py" and not _is_entry_point(tree):
            users.append(f"{path.relative_to(REPO)}:{lines[0]}")
    assert not users, users


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_frame_reading(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in FRAME_ATTRIBUTES:
                hits.append(f"line {node.lineno}: .{node.attr}")
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in FRAME_CALLS:
                hits.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("sys", "inspect"):
            hits += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names if (node.module, a.name) in FRAME_CALLS]
    assert not hits, hits


def _limit(path: Path) -> int | None:
    rel = path.relative_to(REPO).as_posix()
    if rel == "monai_hsrdiff/infer.py":
        return 200
    if rel == "monai_hsrdiff/bundle.py":
        return 300
    if rel.startswith("monai_hsrdiff/networks/"):
        return None
    return 460


@pytest.mark.parametrize(
    "path", [*MODULES, *sorted((REPO / "preprocessing").glob("*.py"))], ids=lambda p: str(p.relative_to(REPO))
)
def test_module_size(path: Path) -> None:
    limit = _limit(path)
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert limit is None or lines <= limit, f"{path.relative_to(REPO)}: {lines} lines > {limit}"
