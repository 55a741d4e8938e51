"""The import picture of plan -> codegen -> runtime (STYLE.md §1), checked on the source: codegen
imports neither runtime nor models, nothing imports upward, and no function body imports across
plan / codegen / runtime (serving code never lowers or imports lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kvcompile"
STAGES = ("plan", "codegen", "runtime")
# function-level imports across the stages that are allowed (none)
KNOWN_LAZY: set[tuple[str, str]] = set()


def _stage(path: Path) -> str | None:
    rel = path.relative_to(PKG).parts
    name = rel[0].removesuffix(".py")
    return name if name in STAGES else None


def _target(node: ast.ImportFrom, path: Path) -> str | None:
    """The top-level kvcompile module a ``from ... import`` names (resolving relative levels)."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        return parts[1] if parts[0] == "kvcompile" and len(parts) > 1 else None
    base = list(path.relative_to(PKG).parent.parts)[: len(path.relative_to(PKG).parent.parts) - (node.level - 1)]
    mod = [*base, *((node.module or "").split(".") if node.module else [])]
    if not mod:  # "from .. import x": the names are the modules
        return node.names[0].name
    return mod[0].removesuffix(".py")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield _target(node, path), id(node) in top or _in_type_checking(tree, node)


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    guards = (n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    return any(c is node for n in guards for c in ast.walk(n))


def _files(stage: str):
    p = PKG / stage
    return sorted(p.glob("*.py")) if p.is_dir() else [PKG / f"{stage}.py"]


def test_codegen_imports_neither_runtime_nor_models():
    bad = [(f.name, t) for f in _files("codegen") for t, _ in _imports(f) if t in ("runtime", "models")]
    assert not bad


def test_no_upward_imports():
    order = {s: i for i, s in enumerate(STAGES)}
    bad = [
        (f.name, t)
        for s in STAGES
        for f in _files(s)
        for t, _ in _imports(f)
        if t in order and order[t] > order[s]
        and (f.name, t) not in KNOWN_LAZY
    ]
    assert not bad


def test_no_function_level_imports_across_plan_codegen_runtime():
    bad = [
        (f.name, t)
        for s in STAGES
        for f in _files(s)
        for t, top in _imports(f)
        if not top and t in STAGES and t != s and (f.name, t) not in KNOWN_LAZY
    ]
    assert not bad
