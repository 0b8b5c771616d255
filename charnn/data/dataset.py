"""The dataset's format: immutable segments of row shards, and numbered versions that list them.

``charnn.rows/3`` (written now): a dataset directory, named by its layout (alphabet, T, R, W,
validation share, shard size, split rule), grows by appending segments::

    segments/<id>/train-w0000-s00000000.arrow ...   Arrow IPC shards (``SHARD_SCHEMA``: ``row`` int32,
                                                    ``start`` int64, ``tokens`` list<uint8>): a run of
                                                    steps of one worker's rows of this segment
    segments/<id>/sources.parquet                   its documents (``SOURCES_SCHEMA``), in stream order
    segments/<id>/segment.json                      its splits (``SegmentRecord``); written last
    versions/v000002/manifest.json                  a version: its segments in order, written after them

A segment is the row layout of the documents one build added, over the dataset's R train rows
(and V validation rows, fixed by its first version): worker w's row r is row r of every segment
back to back, so a version's split is one ``Split`` whose shards are its segments' shards with
their steps shifted by the steps of the segments before them.  A version's URL is its directory
(``.../versions/v000002``); every shard path in it is relative to the dataset directory.  A
segment and a version are never rewritten, so a reader of an older version keeps working while
a newer one is written.

``charnn.rows/2`` and ``charnn.rows/1`` (read, not written): one directory of shards,
``sources.parquet`` (rows/2; rows/1 lists the documents inline) and ``manifest.json``, shard
paths relative to it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from charnn.errors import UserError
from charnn.data.sources import url_keys
from charnn.storage import StorageError, Store, describe_error, join, redact

FORMAT = "charnn.rows/3"
READABLE = ("charnn.rows/1", "charnn.rows/2", FORMAT)
MANIFEST = "manifest.json"
SOURCES = "sources.parquet"
SEGMENT = "segment.json"
SEGMENTS, VERSIONS = "segments", "versions"
VERSION_NAME = re.compile(r"v(\d{6})")
SEGMENT_SHARD = re.compile(r"segments/[0-9a-f]{16}/[\w.-]+\.arrow")  # what a rows/3 shard path may be
SHARD_SCHEMA = pa.schema([("row", pa.int32()), ("start", pa.int64()), ("tokens", pa.list_(pa.uint8()))])
# url: masked (for display); url_key: the SHA-256 of the raw URL (what comparisons go by)
SOURCES_SCHEMA = pa.schema([("url", pa.string()), ("url_key", pa.string()), ("key", pa.string()),
                            ("size", pa.int64()), ("identity", pa.string()), ("tokens", pa.int64()),
                            ("split", pa.string())])


class DatasetError(UserError):
    """A dataset directory that is missing, incomplete or of another format."""


def shard_table(rows: range, start: int, tokens: np.ndarray) -> pa.Table:
    """The shard contract: row i of ``tokens`` (uint8 [len(rows), S]) is row ``rows[i]`` from
    ``start`` on; the table's tokens are ``tokens``' own buffer, not a copy."""
    tokens = np.ascontiguousarray(tokens, np.uint8)
    return pa.table(
        {
            "row": pa.array(rows, pa.int32()),
            "start": pa.array([start] * len(rows), pa.int64()),
            "tokens": pa.ListArray.from_arrays(
                pa.array(np.arange(len(rows) + 1) * tokens.shape[1], pa.int32()), pa.array(tokens.reshape(-1))),
        },
        schema=SHARD_SCHEMA,
    )


def write_shard_file(sink, table: pa.Table) -> None:
    with pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
        writer.write_table(table)


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset directory
    worker: int
    rows: tuple[int, int]  # global rows [first, stop)
    steps: tuple[int, int]  # steps [first, stop): tokens [first*T, stop*T + 1) of each row


@dataclass(frozen=True)
class Split:
    rows: int  # R
    row_length: int  # L
    steps: int  # L / T
    tokens: int  # codes in the split's stream
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class SegmentRef:
    """A version's view of one of its segments: which, and how many steps of each split it adds."""

    id: str
    documents: int
    train_steps: int
    val_steps: int
    content: str  # see SegmentRecord


@dataclass(frozen=True)
class SegmentRecord:
    """``segments/<id>/segment.json``: the segment's own splits, steps counted from its start and
    shard paths relative to its directory; written once its shards and sources table are whole."""

    id: str
    documents: int
    splits: dict[str, Split]
    content: str  # its documents' identities and splits in order: what a run's stream digest goes by
    format: str = FORMAT

    def ref(self) -> SegmentRef:
        return SegmentRef(self.id, self.documents, self.splits["train"].steps, self.splits["val"].steps, self.content)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, url: str, data: bytes) -> "SegmentRecord":
        try:
            body = json.loads(data)
            return cls(body["id"], body["documents"], _splits(body["splits"]), body["content"], body["format"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{url} is damaged ({type(exc).__name__}: {exc}); delete its segment directory "
                               f"and the versions that name it, and build again") from None


def _splits(body: dict) -> dict[str, Split]:
    return {name: Split(s["rows"], s["row_length"], s["steps"], s["tokens"], tuple(
        Shard(h["path"], h["worker"], tuple(h["rows"]), tuple(h["steps"])) for h in s["shards"]))
        for name, s in body.items()}


@dataclass(frozen=True)
class Manifest:
    alphabet: str
    alphabet_size: int
    seq_len: int
    workers: int
    split_rule: str
    val_fraction: float
    documents: int
    splits: dict[str, Split]
    stream: str = ""  # what a run resumes on: see ``stream_digest``
    format: str = FORMAT
    url: str = field(default="", compare=False)  # where it was read from; not stored
    inline_sources: tuple = field(default=(), compare=False, repr=False)  # charnn.rows/1 only
    segments: tuple[SegmentRef, ...] = ()  # charnn.rows/3: in stream order
    version: int = 0  # charnn.rows/3: its number
    waiting: int = 0  # charnn.rows/3: listed documents too few to fill a step of their split: laid out later

    @property
    def directory(self) -> str:
        """The dataset directory, which every shard path is relative to."""
        return self.url.rsplit(f"/{VERSIONS}/", 1)[0] if self.format == FORMAT else self.url

    def shard_url(self, shard: Shard) -> str:
        return join(self.directory, shard.path)

    def to_json(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k not in ("url", "inline_sources")}
        if self.format != FORMAT:
            body = {k: v for k, v in body.items() if k not in ("segments", "version", "waiting")}
        body["sources"] = {"path": SOURCES, "count": self.documents}
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, url: str, data: bytes) -> "Manifest":
        try:
            body = json.loads(data)
            if body.get("format") not in READABLE:
                raise DatasetError(f"{url}: unknown dataset format {body.get('format')!r}; rebuild it with this version")
            splits = _splits(body["splits"])
            paths = [h.path for s in splits.values() for h in s.shards]
            if body["format"] == FORMAT:
                if not all(SEGMENT_SHARD.fullmatch(p) for p in paths):
                    raise ValueError("a shard path is not one of a segment's")
            elif any("/" in p or p.startswith(".") for p in paths):
                raise ValueError("a shard path leaves the dataset directory")
            inline = tuple(body["sources"]) if isinstance(body["sources"], list) else ()
            documents = len(inline) if inline else body["sources"]["count"]
            segments = tuple(SegmentRef(**s) for s in body.get("segments", ()))
            manifest = cls(body["alphabet"], body["alphabet_size"], body["seq_len"], body["workers"],
                           body["split_rule"], body["val_fraction"], documents, splits, body.get("stream", ""),
                           body["format"], url, inline, segments, body.get("version", 0), body.get("waiting", 0))
            if not manifest.stream:  # charnn.rows/1
                manifest = dataclasses.replace(manifest, stream=stream_digest(manifest, manifest.sources()))
            return manifest
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{url}/{MANIFEST} is damaged ({type(exc).__name__}: {exc}); delete {url} "
                               f"and run the job again to rebuild it") from None

    def sources(self, store: Store = Store()) -> pa.Table:
        """The dataset's documents (``SOURCES_SCHEMA``), in stream order (segment by segment)."""
        if self.inline_sources:
            names = [n for n in SOURCES_SCHEMA.names if n != "url_key"]
            return _with_url_keys(pa.Table.from_pylist([{k: d[k] for k in names} for d in self.inline_sources]))
        if self.format != FORMAT:
            return read_sources(join(self.url, SOURCES), self.url, store)
        urls = [join(self.directory, SEGMENTS, s.id, SOURCES) for s in self.segments]
        with ThreadPoolExecutor(16) as pool:  # one read each: many segments on an object store
            tables = list(pool.map(lambda url: read_sources(url, self.url, store), urls))
        return pa.concat_tables(tables) if tables else SOURCES_SCHEMA.empty_table()


def read_sources(url: str, dataset: str, store: Store) -> pa.Table:
    """A sources table (``SOURCES_SCHEMA``); ``dataset`` is what to delete and rebuild if it is damaged."""
    try:
        with store.open(url) as f:
            return _with_url_keys(pq.read_table(f))
    except FileNotFoundError:
        raise DatasetError(f"{redact(url)} is missing: its build did not finish or it was damaged; delete "
                           f"{dataset} and run the job again to rebuild it") from None
    except (pa.ArrowException, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{redact(url)} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                           f"delete {dataset} and run the job again to rebuild it") from None
    except OSError as exc:
        raise StorageError(f"cannot read {describe_error(url, exc)}") from None


def _with_url_keys(table: pa.Table) -> pa.Table:
    """A sources table as ``SOURCES_SCHEMA``; one written before url_key gets the key of its URL."""
    if "url_key" not in table.column_names:
        table = table.append_column("url_key", url_keys(table.column("url")))
    return table.select(SOURCES_SCHEMA.names).cast(SOURCES_SCHEMA)


def stream_digest(manifest: Manifest, sources: pa.Table) -> str:
    """What a run's carried states and position belong to: the training stream's layout (the
    documents' identities and splits in order, the alphabet, T, R, the split; and for rows/3 the
    segments' contents in order), not its URLs or its number of workers, so that a run resumes on
    another W or on a moved corpus."""
    # It must cover, as the manifest records them, the dataset-role settings (charnn.config) that
    # decide which rows a run reads: those that name a segment (charnn.data.build.segment_id), all
    # but the storage-only ones (build.STORAGE_ONLY).  Such a setting added later is recorded in the
    # manifest and hashed here, left out at its default as build.dataset_settings does (so that
    # checkpoints from before it still resume); tests/test_config_roles.py fails until it is.
    digest = hashlib.sha256(json.dumps({
        "alphabet": manifest.alphabet, "seq_len": manifest.seq_len, "rows": manifest.splits["train"].rows,
        "val_fraction": manifest.val_fraction, "split_rule": manifest.split_rule}, sort_keys=True).encode())
    if manifest.format == FORMAT:
        digest.update(json.dumps([s.content for s in manifest.segments]).encode())
        return digest.hexdigest()[:16]
    return content_digest(sources, digest)


def content_digest(sources: pa.Table, digest=None) -> str:
    """A hash of the documents' identities and splits, in order (after what ``digest`` holds)."""
    digest = digest or hashlib.sha256()
    for batch in sources.select(["identity", "split"]).to_batches(2**16):
        for identity, split in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            digest.update(f"{identity}\0{split}\n".encode())
    return digest.hexdigest()[:16]


def version_url(directory: str, number: int) -> str:
    return join(directory, VERSIONS, f"v{number:06d}")


def version_numbers(directory: str, store: Store) -> list[int]:
    """The numbers of the versions under a rows/3 dataset directory, oldest first."""
    return sorted(int(m.group(1)) for name in store.names(join(directory, VERSIONS), directories=True)
                  if (m := VERSION_NAME.fullmatch(name)))


def newest_version(directory: str, store: Store) -> Manifest | None:
    """The newest complete version of a rows/3 dataset directory, or None if it has none."""
    for number in reversed(version_numbers(directory, store)):
        url = version_url(directory, number)
        if store.exists(join(url, MANIFEST)):  # a version directory without one is a build that died
            return load_manifest(url, store)
    return None


def load_manifest(url: str, store: Store = Store()) -> Manifest:
    """The dataset version at ``url``: a version directory, a rows/1-2 dataset directory, or a rows/3
    dataset directory (its newest version)."""
    if not store.exists(join(url, MANIFEST)):
        newest = newest_version(url, store)
        if newest is not None:
            return newest
        raise DatasetError(f"{url} has no {MANIFEST}: not a dataset, or its build did not finish; rebuild it")
    return Manifest.from_json(url, store.read(join(url, MANIFEST)))


def load_segment(directory: str, segment: str, store: Store = Store()) -> SegmentRecord | None:
    """A segment's record, or None if the segment is not whole (no ``segment.json``)."""
    url = join(directory, SEGMENTS, segment, SEGMENT)
    try:
        return SegmentRecord.from_json(url, store.read(url))
    except FileNotFoundError:
        return None


def write_segment(directory: str, record: SegmentRecord, sources: pa.Table, store: Store) -> None:
    """A segment's sources table, then its record: a segment without the record is not whole."""
    base = join(directory, SEGMENTS, record.id)
    write_sources(base, sources, store)
    store.write(join(base, SEGMENT), record.to_json())


def write_version(manifest: Manifest, store: Store) -> bool:
    """``manifest`` as version ``manifest.version`` of its dataset, create-only; False if that
    version exists already with other content (another build wrote it meanwhile)."""
    url, data = join(manifest.url, MANIFEST), manifest.to_json()
    try:
        store.create(url, data)
        return True
    except FileExistsError:
        return store.read(url) == data


def write_sources(url: str, sources: pa.Table, store: Store) -> None:
    with store.open_atomic(join(url, SOURCES)) as f:
        # per-document values are unique: a dictionary would cost memory and save nothing
        pq.write_table(sources.select(SOURCES_SCHEMA.names).cast(SOURCES_SCHEMA), f, row_group_size=2**16,
                       use_dictionary=["split"])
