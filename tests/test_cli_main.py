"""The one ``charnn`` command (charnn/cli/main.py): each subcommand is its charnn-* script, and
README.md stays a short page that links every docs/*.md.  No Ray: fast enough for ``make check``."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from charnn.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# [project.scripts] read as lines: tomllib is not there on Python 3.10, which pyproject.toml allows.
_SECTION = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
SCRIPTS = dict(re.findall(r'^([\w-]+) = "([^"]+)"$', _SECTION, flags=re.MULTILINE))


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_every_charnn_script_is_a_subcommand_with_the_same_entry_point():
    subs = {name.removeprefix("charnn-"): target for name, target in SCRIPTS.items() if name.startswith("charnn-")}
    assert subs, SCRIPTS
    assert SCRIPTS["charnn"] == "charnn.cli.main:main"
    for sub, target in subs.items():
        assert COMMANDS[sub].target == target, sub


def test_help_lists_each_subcommand_on_one_line_without_importing_torch_or_ray():
    listed = run(str(BIN / "charnn"), "--help")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    for sub in [name.removeprefix("charnn-") for name in SCRIPTS if name != "charnn"] + ["corpora"]:
        assert sum(bool(re.match(rf"  {sub} +\S", line)) for line in lines) == 1, (sub, listed.stdout)
    probe = "import sys; from charnn.cli.main import main; main(['--help']); print(sorted(m for m in sys.modules " \
            "if m.split('.')[0] in ('torch', 'ray', 'fsspec', 'pyarrow', 'numpy')))"
    imported = run(sys.executable, "-c", probe)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[-1] == "[]"


# Two of them: each is a process importing torch; the entry-point test above covers the rest of the table.
@pytest.mark.ray  # the slow tier: two job scripts in their own processes (torch and Ray imported)
@pytest.mark.parametrize("sub", ["generate", "tokenize"])
def test_a_subcommands_help_is_its_scripts_help(sub):
    script, command = run(str(BIN / f"charnn-{sub}"), "--help"), run(str(BIN / "charnn"), sub, "--help")
    assert (command.returncode, script.returncode) == (0, 0), command.stderr + script.stderr
    # argparse names the program after argv[0]: "charnn gc" where the script says "charnn-gc", same width
    assert command.stdout == script.stdout.replace(f"usage: charnn-{sub} ", f"usage: charnn {sub} ", 1)
    assert command.stdout.startswith(f"usage: charnn {sub} ")


@pytest.mark.ray  # the slow tier: job scripts in their own processes
def test_a_subcommands_error_and_exit_status_are_its_scripts():
    script = run(str(BIN / "charnn-tokenize"), "--spec", "missing.yaml")
    command = run(str(BIN / "charnn"), "tokenize", "--spec", "missing.yaml")
    assert script.returncode == 2, script.stderr
    assert (command.returncode, command.stdout, command.stderr) == (script.returncode, script.stdout, script.stderr)
    assert command.stderr.strip().count("\n") == 0, command.stderr
    module = run(sys.executable, "-m", "charnn", "tokenize", "--spec", "missing.yaml")
    assert (module.returncode, module.stderr) == (2, script.stderr)


def test_corpora_is_python_m_charnn_data_corpora():
    unknown = run(str(BIN / "charnn"), "corpora", "no-such-corpus")
    plain = run(sys.executable, "-m", "charnn.data.corpora", "no-such-corpus")
    assert (unknown.returncode, unknown.stderr) == (plain.returncode, plain.stderr) == (2, plain.stderr)
    assert "no-such-corpus" in unknown.stderr and "shakespeare" in unknown.stderr
    helped = run(str(BIN / "charnn"), "corpora", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: charnn corpora "), helped


def test_bare_charnn_prints_usage_and_exits_2():
    bare = run(str(BIN / "charnn"))
    assert bare.returncode == 2
    assert bare.stderr.startswith("usage: charnn {") and "train" in bare.stderr


def test_an_unknown_subcommand_is_one_line_naming_it_and_the_valid_ones_exit_2():
    wrong = run(str(BIN / "charnn"), "trian", "--spec", "x.yaml")
    assert wrong.returncode == 2
    assert wrong.stdout == "" and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "'trian'" in wrong.stderr and all(sub in wrong.stderr for sub in COMMANDS), wrong.stderr


def test_the_readme_is_at_most_200_lines_and_links_every_doc():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    docs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    assert docs, "docs/ holds the depth the README leaves out"
    for doc in docs:
        assert f"]({doc})" in readme, doc


def test_the_readme_opens_with_its_two_commands():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    assert first_block.split() == ["make", "demo", "make", "test"], first_block
    assert "`make check`" in readme


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation gone, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_readme_and_docs_names_a_file_and_heading_that_are_there():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, heading = target.partition("#")
            linked = (page.parent / path).resolve()
            assert linked.exists(), (page.name, target)
            if heading:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                assert heading in map(anchor, headings), (page.name, target)
