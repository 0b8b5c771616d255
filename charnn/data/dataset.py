"""The dataset directory's format: row shards, the sources table and ``manifest.json``.

A dataset directory holds Arrow IPC shards (``SHARD_SCHEMA``: ``row`` int32, ``start`` int64,
``tokens`` list<uint8>; each holds a run of steps of one worker's rows), ``sources.parquet``
(one row per document: url, url_key, key, size, identity, tokens, split; tables written before
url_key are read with the key of the URL they hold) and ``manifest.json``, written last.
Format ``charnn.rows/2`` keeps the documents in the Parquet table so that the manifest stays
small for a million documents; ``charnn.rows/1`` manifests, which list them inline, are still
read.  The shard layout is the same in both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from charnn.errors import UserError
from charnn.data.sources import url_keys
from charnn.storage import StorageError, Store, describe_error, join, open_atomic, redact, write_bytes_atomic

FORMAT = "charnn.rows/2"
READABLE = ("charnn.rows/1", FORMAT)
MANIFEST = "manifest.json"
SOURCES = "sources.parquet"
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

    def to_json(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k not in ("url", "inline_sources")}
        body["sources"] = {"path": SOURCES, "count": self.documents}
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, url: str, data: bytes) -> "Manifest":
        try:
            body = json.loads(data)
            if body.get("format") not in READABLE:
                raise DatasetError(f"{url}: unknown dataset format {body.get('format')!r}; rebuild it with this version")
            splits = {name: Split(s["rows"], s["row_length"], s["steps"], s["tokens"], tuple(
                Shard(h["path"], h["worker"], tuple(h["rows"]), tuple(h["steps"])) for h in s["shards"]))
                for name, s in body["splits"].items()}
            if any("/" in h.path or h.path.startswith(".") for s in splits.values() for h in s.shards):
                raise ValueError("a shard path leaves the dataset directory")
            inline = tuple(body["sources"]) if isinstance(body["sources"], list) else ()
            documents = len(inline) if inline else body["sources"]["count"]
            manifest = cls(body["alphabet"], body["alphabet_size"], body["seq_len"], body["workers"],
                           body["split_rule"], body["val_fraction"], documents, splits, body.get("stream", ""),
                           body["format"], url, inline)
            if not manifest.stream:  # charnn.rows/1
                manifest = dataclasses.replace(manifest, stream=stream_digest(manifest, manifest.sources()))
            return manifest
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{url}/{MANIFEST} is damaged ({type(exc).__name__}: {exc}); delete {url} "
                               f"and run the job again to rebuild it") from None

    def sources(self, store: Store = Store()) -> pa.Table:
        """The dataset's documents (``SOURCES_SCHEMA``), in stream order."""
        if self.inline_sources:
            names = [n for n in SOURCES_SCHEMA.names if n != "url_key"]
            return _with_url_keys(pa.Table.from_pylist([{k: d[k] for k in names} for d in self.inline_sources]))
        url = join(self.url, SOURCES)
        try:
            fs, path = store.fs(url)
            with fs.open(path, "rb") as f:
                return _with_url_keys(pq.read_table(f))
        except FileNotFoundError:
            raise DatasetError(f"{self.url} has no {SOURCES}: its build did not finish or it was damaged; delete "
                               f"{self.url} and run the job again to rebuild it") from None
        except (pa.ArrowException, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{redact(url)} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                               f"delete {self.url} and run the job again to rebuild it") from None
        except OSError as exc:
            raise StorageError(f"cannot read {describe_error(url, exc)}") from None


def _with_url_keys(table: pa.Table) -> pa.Table:
    """A sources table as ``SOURCES_SCHEMA``; one written before url_key gets the key of its URL."""
    if "url_key" not in table.column_names:
        table = table.append_column("url_key", url_keys(table.column("url")))
    return table.select(SOURCES_SCHEMA.names).cast(SOURCES_SCHEMA)


def stream_digest(manifest: Manifest, sources: pa.Table) -> str:
    """What a run's carried states and position belong to: the training stream's layout (the
    documents' identities and splits in order, the alphabet, T, R, the split), not its URLs or
    its number of workers, so that a run resumes on another W or on a moved corpus."""
    digest = hashlib.sha256(json.dumps({
        "alphabet": manifest.alphabet, "seq_len": manifest.seq_len, "rows": manifest.splits["train"].rows,
        "val_fraction": manifest.val_fraction, "split_rule": manifest.split_rule}, sort_keys=True).encode())
    for batch in sources.select(["identity", "split"]).to_batches(2**16):
        for identity, split in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            digest.update(f"{identity}\0{split}\n".encode())
    return digest.hexdigest()[:16]


def load_manifest(url: str, store: Store = Store()) -> Manifest:
    fs, path = store.fs(join(url, MANIFEST))
    fs.invalidate_cache(path)
    if not fs.exists(path):
        raise DatasetError(f"{url} has no {MANIFEST}: not a dataset, or its build did not finish; rebuild it")
    return Manifest.from_json(url, fs.cat_file(path))


def write_sources(url: str, sources: pa.Table, store: Store = Store()) -> None:
    fs, path = store.fs(join(url, SOURCES))
    with open_atomic(fs, path) as f:
        # per-document values are unique: a dictionary would cost memory and save nothing
        pq.write_table(sources.select(SOURCES_SCHEMA.names).cast(SOURCES_SCHEMA), f, row_group_size=2**16,
                       use_dictionary=["split"])


def write_manifest(url: str, manifest: Manifest, store: Store = Store()) -> None:
    """Written last: a dataset without its manifest does not exist for any reader."""
    fs, path = store.fs(join(url, MANIFEST))
    write_bytes_atomic(fs, path, manifest.to_json())
