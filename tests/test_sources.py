"""Listing sources and reading them into the document cache, on real files (no Ray): what is
listed, what is left out and said so in one line, and what is an error."""
from __future__ import annotations

import dataclasses
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


# ---------------------------------------------------------------------------------------------
# N-1: the cache and every comparison key a document by its raw URL; masking is for display only.

from hypothesis import given, settings, strategies as st  # noqa: E402

MASKED_NAMES = ["auth=", "token=", "sig=", "?key=", "&key=", "password=", "X-Amz-Signature=", "access_token: "]
_TAIL = st.text(alphabet="abcAB01/=.-_", min_size=0, max_size=10)


@st.composite
def urls_that_may_mask_alike(draw) -> tuple[str, str]:
    """Two distinct raw URLs that ``redact`` often turns into one string."""
    tail_a = draw(_TAIL)
    tail_b = draw(_TAIL.filter(lambda t: t != tail_a))
    if draw(st.booleans()):  # a secret named in the path or the query
        head = draw(st.sampled_from(["/corpus/", "s3://bucket/lang=en/", "https://host/view.php", "gs://b/"]))
        name = draw(st.sampled_from(MASKED_NAMES))
        return f"{head}{name}{tail_a}", f"{head}{name}{tail_b}"
    host = draw(st.sampled_from(["example.com", "127.0.0.1:8000"]))  # a URL's user:password
    return f"https://user:p{tail_a}@{host}/plays/a.txt", f"https://user:p{tail_b}@{host}/plays/a.txt"


def listing_of(urls: list[str], size: int = 58, version: str = "mtime_ns:1700000000000000000") -> pa.Table:
    from charnn.data.sources import LISTING
    from charnn.storage import url_key

    return pa.Table.from_pylist([{"url": u, "key": u.rsplit("/", 1)[-1], "size": size, "version": version,
                                  "url_key": url_key(u)} for u in urls], LISTING)


@settings(max_examples=200, deadline=None)
@given(urls_that_may_mask_alike())
def test_two_distinct_urls_never_share_a_cache_key_or_a_change_detection_key(pair):
    from charnn.data.cache import index_rows
    from charnn.storage import redact, url_key

    first, second = pair
    assert url_key(first) != url_key(second)
    assert url_key(first) == url_key(first) and len(url_key(first)) == 64
    encoded = listing_of([first]).append_column("identity", pa.array(["sha256:first"]))
    index = index_rows(encoded.append_column("blob", pa.array(["b"])).append_column("offset", pa.array([0]))
                       .append_column("tokens", pa.array([58])).append_column("unknown", pa.array([0.0])))
    assert index.column("url").to_pylist() == [redact(first)]  # the index holds no credentials
    found = {d["url"]: d["identity"] for d in lookup(listing_of([first, second]), index).to_pylist()}
    assert found == {first: "sha256:first", second: None}
    # retrain's change detection goes by the same key: the second document is new, never "the same"
    from charnn.cli.retrain import changed_documents

    listed = listing_of([first, second])
    current = dict(zip(listed.column("url_key").to_pylist(), ["sha256:first", "sha256:second"]))
    assert changed_documents(current, {url_key(first): "sha256:first"}) == ([url_key(second)], [])


def test_an_index_written_before_url_keys_finds_only_urls_that_were_not_masked(tmp_path):
    import pyarrow.parquet as pq

    from charnn.data.cache import cache_url

    index = tmp_path / "ds" / cache_url("", "gorner98").lstrip("/") / "index"
    index.mkdir(parents=True)
    old = [{"url": url, "size": 58, "version": "mtime_ns:1700000000000000000", "identity": f"sha256:{n}",
            "blob": "b", "offset": 0, "tokens": 58, "unknown": 0.0}
           for n, url in enumerate(["/c/plain.txt", "/c/auth=***"])]
    pq.write_table(pa.Table.from_pylist(old), index / "old.parquet")
    listing = listing_of(["/c/plain.txt", "/c/auth=public/a.txt", "/c/auth=public/b.txt"])
    found = lookup(listing, load_index(str(tmp_path / "ds"), "gorner98"))
    assert dict(zip(found.column("url").to_pylist(), found.column("identity").to_pylist())) == {
        "/c/plain.txt": "sha256:0", "/c/auth=public/a.txt": None, "/c/auth=public/b.txt": None}


def test_documents_whose_urls_mask_alike_keep_their_own_codes(tmp_path):
    """collide.py: two files of one size and mtime under auth=public/ (as tar, rsync -t or cp -p
    leave them); the second build must find each one's own codes."""
    import numpy as np

    from charnn.data.alphabet import encode
    from charnn.data.build import DatasetRequest, listed_documents
    from charnn.data.cache import cache_url
    from charnn.storage import url_key

    corpus = tmp_path / "corpus" / "auth=public"
    corpus.mkdir(parents=True)
    texts = {"a.txt": b"ROMEO. But soft, what light through yonder window breaks?\n",
             "b.txt": b"HAMLET. To be, or not to be, that is the question, sire!!\n"}
    for name, text in texts.items():
        (corpus / name).write_bytes(text)
        os.utime(corpus / name, ns=(1_700_000_000 * 10**9,) * 2)
    request = DatasetRequest([str(tmp_path / "corpus")], "gorner98", 4, 2, 1, 0.5, 64, str(tmp_path / "ds"))
    first = listed_documents(request)
    assert first.column("url_key").to_pylist() == [url_key(str(corpus / n)) for n in texts]
    encode_group(first.select(["url", "size", "version"]), str(tmp_path / "ds"), "gorner98")
    second = listed_documents(request).to_pylist()
    blobs = tmp_path / "ds" / cache_url("", "gorner98").lstrip("/") / "blobs"
    codes = [np.fromfile(blobs / f"{d['blob']}.u8", np.uint8)[d["offset"]:d["offset"] + d["tokens"]] for d in second]
    assert [c.tobytes() for c in codes] == [encode(t).tobytes() for t in texts.values()]
    assert len({d["identity"] for d in second}) == 2


# ---------------------------------------------------------------------------------------------
# N-9: documents of the published version keep their split; new ones follow the rule.

def keys_by_hash(count: int, above: float, below: float = 1.0, prefix: str = "doc") -> list[str]:
    """``count`` keys whose split hash lies in [above, below)."""
    from charnn.data.sources import split_hash

    found, i = [], 0
    while len(found) < count:
        key, i = f"{prefix}-{i}.txt", i + 1
        if above <= split_hash(key) < below:
            found.append(key)
    return found


def test_kept_splits_stay_and_only_new_documents_take_the_fallbacks():
    import numpy as np

    from charnn.data.sources import split_array, split_hash

    (only,) = keys_by_hash(1, 0.5)
    (added,) = keys_by_hash(1, 0.5, prefix="added")
    assert split_array([only], 0.1).tolist() == ["both"]
    assert split_array([only, added], 0.1).tolist() != ["both", "train"]  # today's rule moves it (N-9)
    assert split_array([only, added], 0.1, np.array(["both", ""])).tolist() == ["both", "train"]
    # no document under val_fraction: the smallest hash was validation; a smaller newcomer moves it today
    old = keys_by_hash(3, 0.3)
    (smaller,) = keys_by_hash(1, 0.01, min(split_hash(k) for k in old), prefix="new")
    before = split_array(old, 0.01)
    assert sorted(before.tolist()) == ["train", "train", "val"]
    assert split_array(old + [smaller], 0.01).tolist()[:3] != before.tolist()
    kept = split_array(old + [smaller], 0.01, np.array([*before.tolist(), ""]))
    assert kept.tolist() == [*before.tolist(), "train"]
    # the fallbacks still give a split that nothing kept covers, from the new documents only
    news = keys_by_hash(2, 0.5, prefix="n")
    assert split_array(old + news, 0.01, np.array(["train"] * 3 + [""] * 2)).tolist()[:3] == ["train"] * 3
    assert "val" in split_array(old + news, 0.01, np.array(["train"] * 3 + [""] * 2)).tolist()[3:]
    assert split_array(old + news, 0.99, np.array(["val"] * 3 + [""] * 2)).tolist().count("train") == 1
    # nothing kept is listed any more: today's rule, the single-document case included
    assert split_array([added], 0.1, np.array([""])).tolist() == ["both"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=12, unique=True),
       st.lists(st.sampled_from(["", "", "train", "val", "both"]), min_size=12, max_size=12),
       st.floats(0.0, 1.0))
def test_kept_documents_never_move(keys, kept, val_fraction):
    import numpy as np

    from charnn.data.sources import split_array

    kept = np.array(kept[:len(keys)])
    splits = split_array(keys, val_fraction, kept)
    assert all(s == k for s, k in zip(splits, kept) if k)
    if (kept == "").all():
        assert splits.tolist() == split_array(keys, val_fraction).tolist()
    elif (kept == "").any():
        assert {"train", "both"} & set(splits) and {"val", "both"} & set(splits)


def test_a_keep_splits_table_keeps_the_published_splits_through_listed_documents(tmp_path):
    import pyarrow.parquet as pq

    from charnn.data.build import DatasetRequest, listed_documents

    corpus = tmp_path / "c"
    corpus.mkdir()
    (only,) = keys_by_hash(1, 0.5, prefix="plays")
    (corpus / only).write_text("the first play\n" * 20)

    def listed(keep: str | None = None) -> dict[str, str]:
        request = DatasetRequest([str(corpus)], "gorner98", 4, 2, 1, 0.1, 64, str(tmp_path / "ds"), keep_splits=keep)
        table = listed_documents(request)
        return dict(zip(table.column("key").to_pylist(), table.column("split").to_pylist()))

    published = listed_documents(DatasetRequest([str(corpus)], "gorner98", 4, 2, 1, 0.1, 64, str(tmp_path / "ds")))
    pq.write_table(published.select(["url_key", "split"]), tmp_path / "published.parquet")
    assert listed() == {only: "both"}
    (added,) = keys_by_hash(1, 0.5, prefix="added")
    (corpus / added).write_text("a second play\n" * 20)
    assert listed()[only] != "both"  # what moved the trained-on document into validation
    assert listed(str(tmp_path / "published.parquet")) == {only: "both", added: "train"}


def test_the_segment_id_changes_with_a_documents_split_but_not_with_the_workers():
    from charnn.data.build import DatasetRequest, segment_id

    request = DatasetRequest(["/c"], "gorner98", 4, 2, 1, 0.5, 64, "/ds")
    documents = pa.table({"url_key": ["ka", "kb"], "identity": ["sha256:a", "sha256:b"], "split": ["train", "val"]})
    swapped = documents.set_column(2, "split", pa.array(["val", "train"]))
    assert segment_id(request, 2, documents) != segment_id(request, 2, swapped)
    assert segment_id(request, 2, documents) != segment_id(request, 1, documents)
    moved = dataclasses.replace(request, workers=2, dataset_root="s3://b/ds")
    assert segment_id(request, 2, documents) == segment_id(moved, 2, documents)


# ---------------------------------------------------------------------------------------------
# N-5 / F-10: a glob walks from its literal root by the directory walk's rules.

class _Deadline(Exception):
    pass


def within(seconds: float):
    """Fail a listing that would run for ever (a symlink cycle) instead of hanging the suite."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def expire(*_):
            raise _Deadline(f"still listing after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return guard()


def test_a_glob_over_a_symlink_cycle_finishes_and_lists_the_file_once(tmp_path, caplog):
    corpus = tmp_path / "c"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "x.txt").write_text("x\n")
    (corpus / "link").symlink_to(corpus / "sub")
    (corpus / "sub" / "up").symlink_to(corpus)
    with within(20), caplog.at_level(logging.WARNING, logger="charnn.pipeline"):
        listing = list_documents([str(corpus / "**" / "*.txt")])
    assert keys(listing) == ["sub/x.txt"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "skipped 2 symlinked directories" in line and "\n" not in line


def test_a_glob_reads_symlinked_files_and_skips_symlinked_directories_with_one_line(tmp_path, caplog):
    corpus = tmp_path / "c"
    write_corpus(corpus / "sub", 1, 3)
    (tmp_path / "outside.txt").write_text("linked text\n")
    (corpus / "sub" / "linked.txt").symlink_to(tmp_path / "outside.txt")
    (corpus / "dirlink").symlink_to(corpus / "sub")
    (corpus / "elsewhere").symlink_to(corpus / "sub")
    with within(20), caplog.at_level(logging.WARNING, logger="charnn.pipeline"):
        listing = list_documents([str(corpus / "*" / "*.txt")])
        assert keys(list_documents([str(corpus / "s*" / "*.txt")])) == ["sub/doc-000.txt", "sub/linked.txt"]
    assert keys(listing) == ["sub/doc-000.txt", "sub/linked.txt"]
    (line,) = [r.getMessage() for r in caplog.records]  # the second glob never enters either link
    assert "skipped 2 symlinked directories" in line and "dirlink" in line and "\n" not in line


def test_an_unreadable_directory_under_a_glob_is_one_line(tmp_path):
    corpus = tmp_path / "c"
    write_corpus(corpus / "locked", 1, 3)
    write_corpus(corpus / "open", 2, 3)
    os.chmod(corpus / "locked", 0)
    try:
        out = run_without_root_powers(
            "from charnn.data.sources import list_documents\n"
            f"try:\n    list_documents([{str(corpus / '**' / '*.txt')!r}])\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
            f"print([k for k in list_documents([{str(corpus / 'o*' / '*.txt')!r}]).column('key').to_pylist()])\n")
    finally:
        os.chmod(corpus / "locked", 0o755)
    assert out.returncode == 0, out.stderr
    listed, pruned = out.stdout.splitlines()
    assert listed == f"StorageError cannot read directory {corpus / 'locked'} (Permission denied); " \
                     f"make it readable or leave it out of data.sources"
    assert pruned == str(["open/doc-000.txt", "open/doc-001.txt"])  # a directory the glob cannot match is not read


@pytest.mark.parametrize("pattern", ["c/*/x.txt", "c/**/*.txt", "c/**", "c/a/**/x.txt", "c/*b*/**/*.txt",
                                     "c/[ab]*/x.txt", "c/?/x.txt", "c/**/b/**/*.txt", "c/**/x.txt", "c/a*",
                                     "c/**/**/*.md", "c/a/b/**", "c/*/*/*", "c/*/.hid/*.txt"])
def test_a_glob_matches_what_glob_glob_matches_on_an_ordinary_tree(tmp_path, pattern):
    import glob

    for name in ["x.txt", "a/x.txt", "a/y.md", "a/b/x.txt", "a/b/c/z.txt", "a/b/c/d/x.txt", "bb/x.txt",
                 "bb/.h.txt", ".hid/x.txt", "a/.hid/x.txt", "ab/cd/x.txt", "b/x.txt", "abc", "a/b/b/q.txt"]:
        (tmp_path / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / name).write_text(name + "\n")
    full = str(tmp_path / pattern)
    root = full[: min(full.find(c) for c in "*?[" if c in full)].rsplit("/", 1)[0]
    expected = sorted({os.path.relpath(m, root) for m in glob.glob(full, recursive=True)
                       if os.path.isfile(m) and not os.path.basename(m).startswith(".")})
    assert expected, "every pattern here matches some file"
    assert keys(list_documents([full])) == expected
