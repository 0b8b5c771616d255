"""Documents: what ``data.sources`` names, listed with metadata only, and the stable split rule.

A listing is an Arrow table (``LISTING``), one row per document, sorted by URL, each with its
``url_key`` (``charnn.storage.url_key``: what the cache and every comparison know it by).  It
is built from a stream of directory entries (``os.scandir`` locally, S3's paginated listing),
a chunk of rows at a time, so the driver holds a few compact columns per document however many
files there are.  A glob is walked from its literal root by the directory walk's rules, never
through a symlinked directory.  A document's ``version`` is what its store says changes when its
bytes change (the mtime in nanoseconds locally, the ETag on S3, the generation on GCS); the
document cache trusts it only together with the URL and the size, and plain HTTP gets none (its
ETags are often mtime-length pairs), so an HTTP document is read on every build.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import posixpath
import stat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from charnn.data.corpora import corpus_path
from charnn.storage import GLOB_CHARS, StorageError, Store, describe_error, url_key

SPLIT_RULE = "sha256(key) < val_fraction; else the smallest hash; one document: its tail"
LISTED = pa.schema([("url", pa.string()), ("key", pa.string()), ("size", pa.int64()), ("version", pa.string())])
LISTING = LISTED.append(pa.field("url_key", pa.string()))
CHUNK_ROWS = 65_536  # rows held as Python objects before they become Arrow columns

log = logging.getLogger("charnn.pipeline")


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
            self.batches.append(pa.RecordBatch.from_arrays(columns, schema=LISTED))
            self.rows = []

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self.batches, LISTED)


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


def url_keys(urls) -> pa.ChunkedArray:
    """``url_key`` of each URL of an Arrow array, a chunk at a time."""
    return pa.chunked_array([pa.array([url_key(u) for u in urls.slice(i, CHUNK_ROWS).to_pylist()], pa.string())
                             for i in range(0, len(urls), CHUNK_ROWS)], pa.string())


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes back as surrogates
        return False


def _scan(directory: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(directory))
    except OSError as exc:
        raise StorageError(f"cannot read directory {directory} ({exc.strerror or exc}); "
                           f"make it readable or leave it out of data.sources") from None


def _walk_local(root: str, columns: _Columns, skipped: _Skipped) -> None:
    """Every regular file under ``root`` (symlinks to files included), hidden names left out."""
    pending, prefix = [root], len(root.rstrip("/")) + 1  # a key is the path below root
    while pending:
        directory = pending.pop()
        for entry in _scan(directory):
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


class _Pattern:
    """A glob's path segments below its literal root, matched one directory level at a time.

    A state is how many segments are matched so far; ``**`` (a whole segment) matches zero or
    more directories, or, as the last segment, every file below.  As in ``glob``, a directory
    whose name starts with "." is entered only by a segment that starts with "." too (``.git``
    or ``.g*``, never ``*`` or ``**``); a file whose name does is never listed, as a directory
    source leaves it out."""

    def __init__(self, segments: list[str]):
        self.segments = segments

    def closure(self, states: set[int]) -> frozenset[int]:
        more = {s + 1 for s in states if s < len(self.segments) and self.segments[s] == "**"}
        return frozenset(states) if more <= states else self.closure(states | more)

    def _matches(self, segment: str, name: str) -> bool:
        if name.startswith(".") and not segment.startswith("."):
            return False
        return segment != "**" and fnmatch.fnmatchcase(name, segment)

    def step(self, states: frozenset[int], name: str) -> tuple[bool, frozenset[int]]:
        """(whether a file called ``name`` matches, the states inside a directory called ``name``:
        empty where nothing below it can match)."""
        last, hidden = len(self.segments) - 1, name.startswith(".")
        live = [s for s in states if s <= last]
        as_file = not hidden and last in states and (self.segments[last] == "**" or
                                                     self._matches(self.segments[last], name))
        inside = {s + 1 for s in live if self._matches(self.segments[s], name)}
        if not hidden:
            inside |= {s for s in live if self.segments[s] == "**"}
        return as_file, frozenset(s for s in self.closure(inside) if s <= last)


def _glob_root(pattern: str) -> str:
    """The directory a glob's first wildcard lies in: where it is walked from, what keys are relative to."""
    return pattern[: min(pattern.find(c) for c in GLOB_CHARS if c in pattern)].rsplit("/", 1)[0] or "/"


def _glob_local(pattern: str, columns: _Columns, skipped: _Skipped) -> None:
    """The files a glob matches, walked from its literal root by ``_walk_local``'s rules
    (symlinked directories are never followed, so a symlink cycle cannot list for ever) and
    entering only directories that something below could match."""
    root = _glob_root(pattern)
    if not os.path.isdir(root):
        return
    match = _Pattern([s for s in pattern[len(root):].split("/") if s])
    pending = [(root, "", match.closure({0}))]
    while pending:
        directory, prefix, states = pending.pop()
        for entry in _scan(directory):
            as_file, inside = match.step(states, entry.name)
            if not (as_file or inside):
                continue
            if not _utf8(entry.name):
                skipped.add("files whose names are not UTF-8", repr(os.fsencode(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                if inside:
                    pending.append((entry.path, f"{prefix}{entry.name}/", inside))
            elif entry.is_symlink() and entry.is_dir():
                if inside:
                    skipped.add("symlinked directories", entry.path)
            elif as_file:
                _add_local(entry.path, prefix + entry.name, columns, skipped)


def _list_local(path: str, columns: _Columns, skipped: _Skipped) -> None:
    if any(c in path for c in GLOB_CHARS):
        _glob_local(path, columns, skipped)
    elif os.path.isdir(path):
        _walk_local(path, columns, skipped)
    elif os.path.lexists(path):
        _add_local(path, posixpath.basename(path), columns, skipped)


def _list_remote(store: Store, url: str, columns: _Columns) -> None:
    scheme = url.split("://", 1)[0]

    def add(full_url: str, key: str, info: dict) -> None:
        if not any(part.startswith(".") for part in key.split("/")):
            columns.add(full_url, key, int(info.get("size") or 0), store_version(info, scheme))

    store.walk(url, add)


def list_documents(sources: list[str], store: Store = Store()) -> pa.Table:
    """Every file the sources name (``LISTING`` rows), sorted by URL, each URL once."""
    tables = []
    for source in sources:
        url = _expand(source)
        columns, skipped = _Columns(), _Skipped(source)
        try:
            path = store.local_path(url)
            if path is not None:
                _list_local(path, columns, skipped)
            else:
                _list_remote(store, url, columns)
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
    # keyed once sorted and unique: the keys are never copied by the sort (at 200,000 documents that
    # was 40 MB more of the driver's peak)
    return listing.append_column(LISTING.field("url_key"), url_keys(listing.column("url")))


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


def split_array(keys, val_fraction: float, kept: np.ndarray | None = None) -> np.ndarray:
    """'train', 'val' or 'both' for each key (see ``assign_splits``).

    ``kept``: per key, the split an earlier version trained it with, or "" for a document it did
    not have.  Kept documents keep theirs, so that a growing corpus never moves text a published
    model trained on into validation; the others follow the rule, and only they may take the
    fallbacks (no validation: the smallest hash; no training: the largest)."""
    if kept is None or not (kept != "").any():
        return _split_by_hash(keys, val_fraction)
    hashes, new = split_hashes(keys), kept == ""
    splits = np.where(new, np.where(hashes < val_fraction, "val", "train"), kept).astype("<U5")
    if new.any() and not np.isin(splits, ["val", "both"]).any():
        splits[np.flatnonzero(new)[np.argmin(hashes[new])]] = "val"
    if new.any() and not np.isin(splits, ["train", "both"]).any():
        splits[np.flatnonzero(new)[np.argmax(hashes[new])]] = "train"
    return splits


def _split_by_hash(keys, val_fraction: float) -> np.ndarray:
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
