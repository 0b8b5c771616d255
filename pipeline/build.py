"""The Ray Data job: sources -> encoded documents (cached by content) -> row shards -> manifest.

The driver handles metadata only.  Reading and encoding run as Ray Data tasks, one per
document; shards are written by Ray Data tasks, one per shard.  ``manifest.json`` is
written last, so a dataset directory without it does not exist for any reader.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from pipeline.alphabet import alphabet_size, encode_bytes, unknown_fraction
from pipeline.layout import Layout, LayoutError, ShardPlan, plan_rows, plan_shards, validation_rows
from pipeline.sources import SPLIT_RULE, assign_splits, content_hash, list_documents, store_identity
from pipeline.storage import describe_error, join, open_url, redact, write_bytes_atomic

FORMAT = "charnn.rows/1"
SHARD_SCHEMA = pa.schema([("row", pa.int32()), ("start", pa.int64()), ("tokens", pa.list_(pa.uint8()))])
UNKNOWN_WARNING = 0.05  # gorner98 codes that are "unknown" above this share: probably not text

log = logging.getLogger("charnn.pipeline")


class PipelineError(RuntimeError):
    """A dataset that cannot be built; the message names the cause and the fix."""


@dataclass(frozen=True)
class DatasetRequest:
    """Everything that determines a dataset's content."""

    sources: list[str]
    alphabet: str
    seq_len: int
    rows: int  # R, the global batch
    workers: int  # W
    val_fraction: float
    shard_mb: int
    dataset_root: str
    storage: Any = None

    @classmethod
    def from_spec(cls, spec) -> "DatasetRequest":
        return cls(
            sources=list(spec.data.sources), alphabet=spec.data.alphabet, seq_len=spec.data.seq_len,
            rows=spec.cluster.num_workers * spec.train.batch_per_worker, workers=spec.cluster.num_workers,
            val_fraction=spec.data.val_fraction, shard_mb=spec.data.shard_mb,
            dataset_root=spec.data.dataset_root, storage=spec.storage,
        )


def doc_cache_url(root: str, alphabet: str, identity: str) -> str:
    return join(root, "documents", alphabet, identity.replace(":", "-") + ".u8")


def _reporting_errors(task):
    """Ray Data task wrapper: a failure comes back as one line in the row, not a Ray traceback."""

    @functools.wraps(task)
    def wrapper(row: dict, **kwargs) -> dict:
        try:
            return {"error": "", **task(row, **kwargs)}
        except Exception as exc:  # noqa: BLE001 - any backend error is reported by the driver
            return {**row, "error": describe_error(row["url"], exc)}

    return wrapper


def read_as_listed(fs, path: str, row: dict) -> bytes:
    """The document's bytes, as the listing saw it: a file that vanished or changed since, or
    while it was read, is an error, so that no dataset mixes two versions of a corpus."""
    try:
        fs.invalidate_cache(path)  # the listing's cached metadata is what we compare against
        before = fs.info(path)
        data = fs.cat_file(path)
        fs.invalidate_cache(path)
        after = fs.info(path)
    except FileNotFoundError:
        raise PipelineError("it disappeared after the sources were listed; run the job again") from None
    same = (store_identity(after) == row["etag"]) if row["etag"] else (
        len(data) == row["size"] == after["size"] and before.get("mtime") == after.get("mtime"))
    if not same:
        raise PipelineError("it changed after the sources were listed or while it was read; run the job again")
    return data


@_reporting_errors
def _encode_document(row: dict, root: str, alphabet: str, storage) -> dict:
    """Ray Data task: identify one document and make sure its codes are in the cache."""
    fs, path = open_url(row["url"], storage)
    data = None
    identity = row["etag"]
    if not identity:
        data = read_as_listed(fs, path, row)
        identity = content_hash(data)
    cache_fs, cache_path = open_url(doc_cache_url(root, alphabet, identity), storage)
    if cache_fs.exists(cache_path):
        tokens, unknown, reused = cache_fs.size(cache_path), -1.0, True
    else:
        data = read_as_listed(fs, path, row) if data is None else data
        codes = encode_bytes(gzip.decompress(data) if row["url"].endswith(".gz") else data, alphabet)
        # A cache entry is rebuilt from its source at will: no fsync, which would idle the core.
        write_bytes_atomic(cache_fs, cache_path, codes, durable=False)
        tokens, unknown, reused = len(codes), unknown_fraction(codes, alphabet), False
    return {**row, "identity": identity, "tokens": int(tokens), "unknown": unknown, "reused": reused}


def _pieces(docs: list[dict], split: str, val_fraction: float, root: str, alphabet: str) -> list[list]:
    """The split's stream as [cache_url, begin, end) pieces of documents, in URL order."""
    pieces = []
    for d in docs:
        cache = doc_cache_url(root, alphabet, d["identity"])
        if d["split"] == split:
            pieces.append([cache, 0, d["tokens"]])
        elif d["split"] == "both":
            cut = d["tokens"] - int(d["tokens"] * val_fraction)
            pieces.append([cache, 0, cut] if split == "train" else [cache, cut, d["tokens"]])
    return [p for p in pieces if p[2] > p[1]]


def read_stream(pieces: list[list], begin: int, end: int, storage) -> np.ndarray:
    """Tokens [begin, end) of a stream made of document pieces (range reads only)."""
    out, offset = [], 0
    for url, p_begin, p_end in pieces:
        length = p_end - p_begin
        lo, hi = max(begin, offset), min(end, offset + length)
        if lo < hi:
            fs, path = open_url(url, storage)
            out.append(np.frombuffer(fs.cat_file(path, start=p_begin + lo - offset, end=p_begin + hi - offset), np.uint8))
        offset += length
    data = np.concatenate(out) if out else np.zeros(0, np.uint8)
    if data.size != end - begin:
        raise PipelineError(f"cached documents are shorter than their metadata ({data.size} < {end - begin}); "
                            f"delete {pieces[0][0].rsplit('/', 1)[0]} and rebuild")
    return data


def shard_table(rows: range, start: int, segments: list[np.ndarray]) -> pa.Table:
    """The shard contract: one equal-length segment per row, all starting at ``start``."""
    return pa.table(
        {
            "row": pa.array(rows, pa.int32()),
            "start": pa.array([start] * len(rows), pa.int64()),
            "tokens": pa.ListArray.from_arrays(
                pa.array(np.arange(len(rows) + 1) * len(segments[0]), pa.int32()),
                pa.array(np.concatenate(segments), pa.uint8()),
            ),
        },
        schema=SHARD_SCHEMA,
    )


def write_shard_file(sink, table: pa.Table) -> None:
    with pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
        writer.write_table(table)


@_reporting_errors
def _write_shard(row: dict, pieces: dict, storage) -> dict:
    """Ray Data task: cut one worker's step range out of its rows and write it as Arrow IPC."""
    T, L = row["seq_len"], row["row_length"]
    s0, s1 = row["steps"]
    rows = range(*row["rows"])
    segments = [read_stream(pieces[row["split"]], r * L + s0 * T, r * L + s1 * T + 1, storage) for r in rows]
    fs, path = open_url(row["url"], storage)
    with fs.open(path, "wb") as sink:
        write_shard_file(sink, shard_table(rows, s0 * T, segments))
    return {"url": row["url"]}


def dataset_key(request: DatasetRequest, docs: list[dict]) -> str:
    identity = {
        "format": FORMAT, "alphabet": request.alphabet, "seq_len": request.seq_len, "rows": request.rows,
        "workers": request.workers, "val_fraction": request.val_fraction, "shard_mb": request.shard_mb,
        "split_rule": SPLIT_RULE, "sources": [[d["url"], d["identity"]] for d in docs],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _layouts(request: DatasetRequest, docs: list[dict]) -> dict[str, Layout]:
    sizes = {s: sum(p[2] - p[1] for p in _pieces(docs, s, request.val_fraction, "", request.alphabet))
             for s in ("train", "val")}
    try:
        train = plan_rows(sizes["train"], request.rows, request.seq_len)
        val_rows = validation_rows(sizes["val"], request.rows, request.seq_len, request.workers)
        return {"train": train, "val": plan_rows(sizes["val"], val_rows, request.seq_len)}
    except LayoutError as exc:
        raise PipelineError(str(exc)) from None


def build_dataset(request: DatasetRequest) -> str:
    """URL of the dataset directory for ``request``, built unless it exists already."""
    import ray.data

    started = time.perf_counter()
    alphabet_size(request.alphabet)
    if request.workers <= 0 or request.rows % request.workers:
        raise PipelineError(f"{request.rows} rows cannot be split evenly over {request.workers} workers")
    documents = list_documents(request.sources, request.storage)
    root = request.dataset_root
    splits = assign_splits([d.key for d in documents], request.val_fraction)
    items = [{"url": d.url, "key": d.key, "size": d.size, "etag": d.etag or "", "split": splits[d.key]}
             for d in documents]
    docs = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _encode_document, fn_kwargs={"root": root, "alphabet": request.alphabet, "storage": request.storage}
    ).take_all()
    _raise_first_error(docs, "reading a source failed")
    docs.sort(key=lambda d: d["url"])
    _check_documents(docs, request.alphabet)
    layouts = _layouts(request, docs)
    url = join(root, dataset_key(request, docs))
    fs, manifest_path = open_url(join(url, "manifest.json"), request.storage)
    if fs.exists(manifest_path):
        log.info("dataset %s exists; reusing it", url)
        return url

    manifest_splits, shard_rows, pieces = {}, [], {}
    shard_tokens = request.shard_mb * 2**20
    for split, layout in layouts.items():
        pieces[split] = _pieces(docs, split, request.val_fraction, root, request.alphabet)
        plans = plan_shards(layout, request.workers, shard_tokens)
        manifest_splits[split] = {
            "rows": layout.rows, "row_length": layout.row_length, "steps": layout.steps,
            "tokens": sum(p[2] - p[1] for p in pieces[split]),
            "shards": [_shard_entry(p, split) for p in plans],
        }
        shard_rows += [_shard_task(p, split, layout, url) for p in plans]
    fs.makedirs(posixpath.dirname(manifest_path), exist_ok=True)
    written = ray.data.from_items(shard_rows, override_num_blocks=len(shard_rows)).map(
        _write_shard, fn_kwargs={"pieces": pieces, "storage": request.storage}
    ).take_all()
    _raise_first_error(written, f"writing shards under {url} failed")

    manifest = {
        "format": FORMAT, "alphabet": request.alphabet, "alphabet_size": alphabet_size(request.alphabet),
        "seq_len": request.seq_len, "workers": request.workers, "split_rule": SPLIT_RULE,
        "val_fraction": request.val_fraction,
        "sources": [{**{k: d[k] for k in ("key", "size", "identity", "tokens", "split")}, "url": redact(d["url"])}
                    for d in docs],
        "splits": manifest_splits,
    }
    write_bytes_atomic(fs, manifest_path, json.dumps(manifest, indent=1).encode())
    _summarise(docs, manifest_splits, time.perf_counter() - started)
    return url


def _shard_entry(plan: ShardPlan, split: str) -> dict:
    return {"path": plan.name(split), "worker": plan.worker, "rows": [plan.rows.start, plan.rows.stop],
            "steps": [plan.steps.start, plan.steps.stop]}


def _shard_task(plan: ShardPlan, split: str, layout: Layout, url: str) -> dict:
    return {"url": join(url, plan.name(split)), "path": plan.name(split), "split": split,
            "rows": [plan.rows.start, plan.rows.stop], "steps": [plan.steps.start, plan.steps.stop],
            "seq_len": layout.seq_len, "row_length": layout.row_length}


def _check_documents(docs: list[dict], alphabet: str) -> None:
    if sum(d["tokens"] for d in docs) == 0:
        raise PipelineError("the corpus is empty: every source file has 0 bytes; point data.sources at text")
    for d in docs:
        if d["unknown"] > UNKNOWN_WARNING:
            log.warning("%s: %.0f%% of its characters are outside %s; is it a binary file?",
                        d["url"], 100 * d["unknown"], alphabet)


def _summarise(docs: list[dict], splits: dict, seconds: float) -> None:
    mb = sum(d["size"] for d in docs) / 1e6
    reused = sum(d["reused"] for d in docs)
    print(
        f"charnn.pipeline: {len(docs)} documents ({reused} reused from cache), {mb:.1f} MB, "
        f"{sum(d['tokens'] for d in docs)} tokens; train {splits['train']['rows']} rows x "
        f"{splits['train']['row_length']}, val {splits['val']['rows']} rows x {splits['val']['row_length']}; "
        f"{seconds:.1f} s, {mb / max(seconds, 1e-9):.1f} MB/s",
        file=sys.stderr, flush=True,
    )


def _raise_first_error(rows: list[dict], what: str) -> None:
    failed = [r["error"] for r in rows if r["error"]]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise PipelineError(f"{what}: {failed[0]}{more}")

