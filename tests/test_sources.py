"""Listing sources and reading them into the document cache, on real files (no Ray): what is
listed, what is left out and said so in one line, and what is an error."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest

from support.env import REPO
from support.jobs import write_corpus
from charnn.data.cache import encode_group, load_index, lookup
from charnn.data.sources import list_documents
from charnn.storage import StorageError, Store

ROOT_CAN_READ_ANYTHING = os.geteuid() == 0


def keys(table: pa.Table) -> list[str]:
    return table.column("key").to_pylist()


def errors(listing: pa.Table, root) -> dict[str, str | None]:
    """{document key: its error or None} from encoding the listing into the cache at ``root``."""
    return dict(zip(keys(listing), encode_group(listing, str(root), "gorner98").column("error").to_pylist()))


def test_a_directory_lists_its_files_nested_hidden_ones_left_out(tmp_path):
    write_corpus(tmp_path / "c" / "sub" / "deeper", 2, 3)
    (tmp_path / "c" / "top.txt").write_text("top\n")
    (tmp_path / "c" / ".git").mkdir()
    (tmp_path / "c" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "c" / ".hidden.txt").write_text("no\n")
    listing = list_documents([str(tmp_path / "c")])
    assert keys(listing) == ["sub/deeper/doc-000.txt", "sub/deeper/doc-001.txt", "top.txt"]
    assert listing.column("url").to_pylist() == sorted(listing.column("url").to_pylist())
    assert all(v.startswith("mtime_ns:") for v in listing.column("version").to_pylist())


def test_symlinks_to_files_are_read_symlinked_directories_are_skipped_with_one_line(tmp_path, caplog):
    corpus = tmp_path / "c"
    write_corpus(corpus / "sub", 1, 3)
    (tmp_path / "outside.txt").write_text("linked text\n")
    (corpus / "linked.txt").symlink_to(tmp_path / "outside.txt")
    (corpus / "dirlink").symlink_to(corpus / "sub")
    (corpus / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    with caplog.at_level(logging.WARNING, logger="charnn.pipeline"):
        listing = list_documents([str(corpus)])
    assert keys(listing) == ["linked.txt", "sub/doc-000.txt"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "skipped 1 symlinked directories" in line and "dirlink" in line and "\n" not in line
    assert errors(listing, tmp_path / "ds") == {"linked.txt": None, "sub/doc-000.txt": None}


def test_a_file_name_that_is_not_utf8_is_skipped_with_one_line(tmp_path, caplog):
    corpus = tmp_path / "c"
    write_corpus(corpus, 2, 3)
    fd = os.open(os.fsencode(corpus) + b"/bad\xff.txt", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"text\n")
    os.close(fd)
    with caplog.at_level(logging.WARNING, logger="charnn.pipeline"):
        listing = list_documents([str(corpus)])
    assert keys(listing) == ["doc-000.txt", "doc-001.txt"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "files whose names are not UTF-8" in line and "bad\\xff.txt" in line


def test_an_empty_or_missing_source_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty", tmp_path / "missing", tmp_path / "empty" / "*.txt"):
        with pytest.raises(StorageError, match="matches no files") as info:
            list_documents([str(source)])
        assert "\n" not in str(info.value)


def run_without_root_powers(code: str) -> subprocess.CompletedProcess:
    """Python code run as this user, but with root's power to read anything dropped (CI runs as
    root, and root ignores file permissions)."""
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if ROOT_CAN_READ_ANYTHING else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_an_unreadable_directory_or_file_is_one_line(tmp_path):
    corpus = tmp_path / "c"
    write_corpus(corpus / "locked", 1, 3)
    write_corpus(corpus / "open", 2, 3)
    os.chmod(corpus / "locked", 0)
    os.chmod(corpus / "open" / "doc-001.txt", 0)
    try:
        out = run_without_root_powers(
            "from charnn.data.sources import list_documents\n"
            "from charnn.data.cache import encode_group\n"
            f"try:\n    list_documents([{str(corpus)!r}])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            f"listing = list_documents([{str(corpus / 'open')!r}])\n"
            f"print([r['error'] for r in encode_group(listing, {str(tmp_path / 'ds')!r}, 'gorner98').to_pylist()])\n")
    finally:
        os.chmod(corpus / "locked", 0o755)
    assert out.returncode == 0, out.stderr
    listed, encoded = out.stdout.splitlines()
    assert listed == f"StorageError cannot read directory {corpus / 'locked'} (Permission denied); " \
                     f"make it readable or leave it out of data.sources"
    assert encoded == str([None, f"{corpus / 'open' / 'doc-001.txt'}: it cannot be read (Permission denied); "
                                 f"make it readable or leave it out of data.sources"])


def test_a_document_that_changes_while_it_is_read_is_an_error(tmp_path):
    from charnn.data.cache import _ListedFile

    path = tmp_path / "c" / "a.txt"
    write_corpus(path.parent, 1, 2000)
    os.replace(path.parent / "doc-000.txt", path)
    (doc,) = list_documents([str(path.parent)]).to_pylist()
    listed = _ListedFile(doc, Store().fs(doc["url"])[0])
    first = listed.read(100)
    with open(path, "r+b") as f:  # same size, new content, after the read began
        f.write(b"X" * 10)
    read = len(first) + len(listed.read())
    with pytest.raises(Exception, match="changed after the sources were listed or while it was read"):
        listed.verify(read)


def test_a_gzip_bomb_and_a_broken_gzip_are_one_line_each(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "bomb.txt.gz").write_bytes(gzip.compress(b"a" * (200 * 2**20), compresslevel=1))
    (corpus / "broken.txt.gz").write_bytes(gzip.compress(b"some text\n" * 100)[:-12])
    (corpus / "fine.txt.gz").write_bytes(gzip.compress(b"fine text\n" * 100))
    found = errors(list_documents([str(corpus)]), tmp_path / "ds")
    assert "expands to over 100 times its size when gunzipped" in found["bomb.txt.gz"]
    assert "is not a valid gzip file" in found["broken.txt.gz"]
    assert found["fine.txt.gz"] is None
    assert all("\n" not in e for e in found.values() if e)


def test_the_cache_finds_a_document_again_only_as_listed(tmp_path):
    corpus = tmp_path / "c"
    write_corpus(corpus, 3, 20)
    root = tmp_path / "ds"
    first = list_documents([str(corpus)])
    assert all(e is None for e in errors(first, root).values())
    index = load_index(str(root), "gorner98")
    assert index.num_rows == 3 and all(i.startswith("sha256:") for i in index.column("identity").to_pylist())
    (corpus / "doc-001.txt").write_text("rewritten\n")
    found = lookup(list_documents([str(corpus)]), index)
    assert [i is not None for i in found.column("identity").to_pylist()] == [True, False, True]


def test_a_document_too_large_for_memory_is_encoded_in_chunks(tmp_path):
    """A 200 MB document (gzipped) encodes with a peak well under its size: it is streamed, not read whole."""
    import random

    corpus = tmp_path / "c"
    corpus.mkdir()
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    block = "".join(" ".join(rng.choices(words, k=12)) + "\r\n" for _ in range(20_000)).encode()  # ~1 MB
    repeats = 200 * 2**20 // len(block)
    with gzip.open(corpus / "big.txt.gz", "wb", compresslevel=1) as f:  # deflate sees 32 KB back: ratio ~3
        for _ in range(repeats):
            f.write(block)
    out = subprocess.run([sys.executable, "-c",
                          "import re\n"
                          "from charnn.data.sources import list_documents\nfrom charnn.data.cache import encode_group\n"
                          f"r = encode_group(list_documents([{str(corpus)!r}]), {str(tmp_path / 'ds')!r}, 'gorner98')\n"
                          "print(repr(r.column('error')[0].as_py()))\n"
                          "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
                          "print(r.column('tokens')[0].as_py(), int(peak) // 1024)"],  # ru_maxrss inherits the parent's
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    error, figures = out.stdout.splitlines()
    assert error == "None", out.stderr
    tokens, peak_mb = map(int, figures.split())
    assert tokens == repeats * (len(block) - block.count(b"\r"))  # CRLF became LF
    assert peak_mb < 200, f"peak RSS {peak_mb} MB for a {repeats} MB document"


def test_a_charnn_rows_1_manifest_is_still_read():
    import json

    from charnn.data.dataset import DatasetError, Manifest

    old = {"format": "charnn.rows/1", "alphabet": "gorner98", "alphabet_size": 98, "seq_len": 8, "workers": 2,
           "split_rule": "r", "val_fraction": 0.25,
           "sources": [{"key": "a.txt", "size": 9, "identity": "sha256:aa", "tokens": 9, "split": "train",
                        "url": "/c/a.txt"}],
           "splits": {s: {"rows": 4, "row_length": 8, "steps": 1, "tokens": 40,
                          "shards": [{"path": f"{s}-w0000-s00000000.arrow", "worker": 0, "rows": [0, 2],
                                      "steps": [0, 1]}]} for s in ("train", "val")}}
    manifest = Manifest.from_json("/d", json.dumps(old).encode())
    assert manifest.documents == 1 and manifest.splits["val"].shards[0].rows == (0, 2)
    assert manifest.sources().to_pylist()[0]["identity"] == "sha256:aa"
    old["splits"]["train"]["shards"][0]["path"] = "../../elsewhere.arrow"
    with pytest.raises(DatasetError, match="is damaged .*a shard path leaves the dataset directory"):
        Manifest.from_json("/d", json.dumps(old).encode())
    with pytest.raises(DatasetError, match="unknown dataset format 'charnn.rows/9'"):
        Manifest.from_json("/d", json.dumps({**old, "format": "charnn.rows/9"}).encode())
