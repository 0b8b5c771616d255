"""The shape the code keeps (issues 14 and 25): ruff's rules in pyproject.toml (short functions, few
parameters, short lines; `make check` runs ruff too), no sys.path edits, and the packages below the
command line never import it."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("charnn", "bench", "infra", "jobs", "tests")
                 for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)


def ruff() -> str | None:
    """The ruff of this environment (the test extra installs it), else one on the PATH."""
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.exists() else shutil.which("ruff")


@pytest.mark.skipif(ruff() is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    proc = subprocess.run([ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


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


def test_the_files_that_run_first_are_test_files_here():
    from conftest import LONG_FILES

    assert len(set(LONG_FILES)) == len(LONG_FILES)
    assert [name for name in LONG_FILES if not (REPO / "tests" / name).is_file()] == []
