"""The shape the code keeps (issue 14): small functions, short signatures, no sys.path edits, and
the packages below the command line never import it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("charnn", "bench", "infra", "jobs", "tests")
                 for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)
MAX_LINES, MAX_PARAMETERS = 50, 6


def functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameters(function: ast.FunctionDef) -> int:
    args = function.args
    named = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.arg not in ("self", "cls")]
    return len(named) + bool(args.vararg) + bool(args.kwarg)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_short_and_take_few_parameters(path):
    tree = ast.parse(path.read_text())
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_LINES]
    wide = [f"{f.name} ({parameters(f)} parameters)" for f in functions(tree) if parameters(f) > MAX_PARAMETERS]
    assert not long and not wide, f"{path.name}: {long + wide}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_rewrites_sys_path(path):
    def edits_path(node: ast.AST) -> bool:
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return any(ast.unparse(t).startswith("sys.path") for t in targets)
        return isinstance(node, ast.Call) and ast.unparse(node.func).startswith("sys.path.")

    edits = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if edits_path(n)]
    assert not edits, f"{path.name} edits sys.path at lines {edits}"


def test_data_and_training_never_import_the_command_line():
    upward = []
    for path in (REPO / "charnn").rglob("*.py"):
        if path.parent.name in ("data", "train"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                upward += [f"{path.name}: {n}" for n in names if n.startswith(("charnn.cli", "jobs"))]
    assert not upward
