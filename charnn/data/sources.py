"""Documents: what ``data.sources`` names, listed with metadata only, and the stable split rule.

A listing is an Arrow table (``LISTING``), one row per document, sorted by URL.  It is built
from a stream of directory entries (``os.scandir`` locally, S3's paginated listing), a chunk
of rows at a time, so the driver holds a few compact columns per document however many files
there are.  A document's ``version`` is what its store says changes when its bytes change (the
mtime in nanoseconds locally, the ETag on S3, the generation on GCS); the document cache trusts
it only together with the URL and the size, and plain HTTP gets none (its ETags are often
mtime-length pairs), so an HTTP document is read on every build.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import posixpath
import stat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from charnn.data import s3
from charnn.data.corpora import corpus_path
from charnn.storage import StorageError, Store, describe_error, is_local, protocol

GLOB_CHARS = "*?["
SPLIT_RULE = "sha256(key) < val_fraction; else the smallest hash; one document: its tail"
LISTING = pa.schema([("url", pa.string()), ("key", pa.string()), ("size", pa.int64()), ("version", pa.string())])
CHUNK_ROWS = 65_536  # rows held as Python objects before they become Arrow columns

log = logging.getLogger("charnn.pipeline")


def _full_url(fs, path: str) -> str:
    scheme = protocol(fs)
    if scheme in ("file", "local") or "://" in path:  # HTTP paths are full URLs already
        return path
    return f"{scheme}://{path}"


def store_version(info: dict, protocol: str) -> str:
    """What the store says changes whenever the object's bytes change, or "" if it says nothing
    we trust (HTTP ETags are often an mtime in seconds and a length)."""
    if protocol in ("http", "https"):
        return ""
    for field in ("generation", "ETag", "etag", "md5Hash", "crc32c"):
        if info.get(field):
            return f"{field.lower()}:{str(info[field]).strip(chr(34))}"
    return ""


def _expand(source: str) -> str:
    return corpus_path(source[len("corpus:"):]) if source.startswith("corpus:") else source


class _Columns:
    """Rows collected a chunk at a time into Arrow record batches."""

    def __init__(self):
        self.batches: list[pa.RecordBatch] = []
        self.rows: list[tuple] = []

    def add(self, url: str, key: str, size: int, version: str) -> None:
        self.rows.append((url, key, size, version))
        if len(self.rows) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [list(c) for c in zip(*self.rows)]
            self.batches.append(pa.RecordBatch.from_arrays(columns, schema=LISTING))
            self.rows = []

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self.batches, LISTING)


class _Skipped:
    """Entries a listing leaves out on purpose, reported as one warning line per kind."""

    def __init__(self, source: str):
        self.source, self.kinds = source, {}

    def add(self, kind: str, example: str) -> None:
        count, first = self.kinds.get(kind, (0, example))
        self.kinds[kind] = (count + 1, first)

    def report(self) -> None:
        fixes = {"symlinked directories": "they are not followed; name their targets in data.sources",
                 "files whose names are not UTF-8": "rename them to include them",
                 "entries that are not regular files": "pipes, sockets and devices are never read"}
        for kind, (count, first) in self.kinds.items():
            log.warning("%s: skipped %d %s (first: %s); %s", self.source, count, kind, first, fixes[kind])


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes back as surrogates
        return False


def _walk_local(root: str, columns: _Columns, skipped: _Skipped) -> None:
    """Every regular file under ``root`` (symlinks to files included), hidden names left out."""
    pending, prefix = [root], len(root.rstrip("/")) + 1  # a key is the path below root
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise StorageError(f"cannot read directory {directory} ({exc.strerror or exc}); "
                               f"make it readable or leave it out of data.sources") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not _utf8(entry.name):
                skipped.add("files whose names are not UTF-8", repr(os.fsencode(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.is_symlink() and entry.is_dir():
                skipped.add("symlinked directories", entry.path)
            else:
                _add_local(entry.path, entry.path[prefix:], columns, skipped)


def _add_local(path: str, key: str, columns: _Columns, skipped: _Skipped) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:  # a dangling symlink, or a file removed while listing
        return
    if stat.S_ISREG(st.st_mode):
        columns.add(path, key, st.st_size, f"mtime_ns:{st.st_mtime_ns}")
    else:
        skipped.add("entries that are not regular files", path)


def _list_local(path: str, columns: _Columns, skipped: _Skipped) -> None:
    if any(c in path for c in GLOB_CHARS):
        root = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        for match in glob.iglob(path, recursive=True):
            if not _utf8(match):
                skipped.add("files whose names are not UTF-8", repr(os.fsencode(match)))
            elif not os.path.isdir(match) and not os.path.basename(match).startswith("."):
                _add_local(match, posixpath.relpath(match, root), columns, skipped)
    elif os.path.isdir(path):
        _walk_local(path, columns, skipped)
    elif os.path.lexists(path):
        _add_local(path, posixpath.basename(path), columns, skipped)


def _list_remote(fs, path: str, columns: _Columns) -> None:
    scheme = protocol(fs)

    def add(p: str, info: dict) -> None:
        key = posixpath.relpath(p, root)
        if info.get("type") == "file" and not any(part.startswith(".") for part in key.split("/")):
            columns.add(_full_url(fs, p), key, int(info.get("size") or 0), store_version(info, scheme))

    if any(c in path for c in GLOB_CHARS):
        root = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        entries = fs.glob(path, detail=True).items()
    elif fs.isdir(path):
        root = path
        if scheme in ("s3", "s3a"):
            return s3.list_objects(fs, path, add)
        entries = fs.find(path, detail=True).items()
    else:
        root, entries = posixpath.dirname(path), [(path, fs.info(path))] if fs.exists(path) else []
    for p, info in entries:
        add(p, info)


def list_documents(sources: list[str], store: Store = Store()) -> pa.Table:
    """Every file the sources name (``LISTING`` rows), sorted by URL, each URL once."""
    tables = []
    for source in sources:
        url = _expand(source)
        columns, skipped = _Columns(), _Skipped(source)
        try:
            fs, path = store.fs(url)
            if is_local(fs):
                _list_local(path, columns, skipped)
            else:
                fs.invalidate_cache()  # a listing cached by an earlier build would hide new files
                _list_remote(fs, path, columns)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
            raise StorageError(f"cannot list source {describe_error(url, exc)}") from None
        skipped.report()
        table = columns.table()
        if table.num_rows == 0:
            raise StorageError(f"source {source!r} matches no files; check the path, glob or bucket")
        tables.append(table)
    listing = _unique_urls(pa.concat_tables(tables).sort_by("url"))
    del tables
    pa.default_memory_pool().release_unused()  # the unsorted copy goes back to the system
    return listing


def _unique_urls(table: pa.Table) -> pa.Table:
    """Rows of a URL-sorted table, the first of each URL (two sources may name one file)."""
    urls = table.column("url")
    if table.num_rows < 2:
        return table
    repeated = pc.equal(urls.slice(1), urls.slice(0, table.num_rows - 1))
    keep = pc.invert(pa.concat_arrays([pa.array([False]), repeated.combine_chunks()]))
    return table.filter(keep)


def split_hashes(keys) -> np.ndarray:
    """Each key's SHA-256 as a number in [0, 1): what decides its split.  ``keys`` may be an Arrow
    array, read a chunk at a time, so that a million keys never become Python strings at once."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        return np.concatenate([split_hashes(keys.slice(i, CHUNK_ROWS).to_pylist())
                               for i in range(0, len(keys), CHUNK_ROWS)] or [np.zeros(0)])
    return np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64 for k in keys])


def split_hash(key: str) -> float:
    return float(split_hashes([key])[0])


def split_array(keys, val_fraction: float) -> np.ndarray:
    """'train', 'val' or 'both' for each key (see ``assign_splits``)."""
    if len(keys) == 1:
        return np.array(["both"])
    hashes = split_hashes(keys)
    splits = np.where(hashes < val_fraction, "val", "train").astype("<U5")
    if not (splits == "val").any():
        splits[np.argmin(hashes)] = "val"
    if not (splits == "train").any():
        splits[np.argmax(hashes)] = "train"
    return splits


def assign_splits(keys: list[str], val_fraction: float) -> dict[str, str]:
    """'train' or 'val' per document key; a document's split depends only on its own key
    unless no key falls under ``val_fraction`` (then the smallest hash is validation).
    A single document is 'both': its last ``val_fraction`` of tokens are validation."""
    return dict(zip(keys, split_array(keys, val_fraction).tolist()))
