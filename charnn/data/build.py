"""The Ray job: sources -> the document cache -> row shards -> sources table -> manifest.

The driver lists the sources and looks every document up in the cache index; it holds a few
Arrow columns per document, never the documents.  Documents that are new or changed are
encoded by Ray tasks, one per group of up to ``GROUP_BYTES`` of input (many small files, or
one large one), each writing one cache blob.  Shards are written by Ray tasks, one per shard,
each reading only the pieces of the cache that its rows cover.  ``manifest.json`` is
written last, so a dataset directory without it does not exist for any reader.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from charnn.errors import CharnnError, UserError, root_cause
from charnn.data.alphabet import alphabet_size
from charnn.data.cache import FIGURES, RESULT, cache_url, dataset_root_access, encode_group, load_index, lookup
from charnn.data.dataset import (FORMAT, Manifest, Shard, Split, shard_table, stream_digest, write_manifest,
                              write_shard_file, write_sources)
from charnn.data.layout import Layout, LayoutError, ShardPlan, plan_rows, plan_shards, validation_rows
from charnn.data.sources import CHUNK_ROWS, SPLIT_RULE, list_documents, split_array, url_keys
from charnn.storage import StorageError, Store, describe_error, join, open_atomic, redact, redact_urls
from charnn.data.stream import BlobReader, Stream

GROUP_BYTES = 128 * 2**20  # an encode task's cost, at most (a single larger document is a task of its own)
GROUP_MIN_BYTES = 4 * 2**20  # ... and at least, unless the corpus costs less
DOCUMENT_COST = 8 * 2**10  # what opening and reading one more file costs, in bytes read
TASK_ATTEMPTS = 3  # runs of a task at most, when its worker dies (out of memory, a lost node)
UNKNOWN_WARNING = 0.05  # gorner98 codes that are "unknown" above this share: probably not text
WARNINGS_SHOWN = 5
SPLITS = ("train", "val", "both")

log = logging.getLogger("charnn.pipeline")


class PipelineError(UserError):
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
    store: Store = Store()
    # URL of a Parquet table (url_key, split): documents it lists keep that split, even if rewritten
    # since (a published version's sources table: a retrain never validates on text it trained on)
    keep_splits: str | None = None

    @classmethod
    def from_spec(cls, spec) -> "DatasetRequest":
        return cls(
            sources=list(spec.data.sources), alphabet=spec.data.alphabet, seq_len=spec.data.seq_len,
            rows=spec.cluster.num_workers * spec.train.batch_per_worker, workers=spec.cluster.num_workers,
            val_fraction=spec.data.val_fraction, shard_mb=spec.data.shard_mb,
            dataset_root=spec.data.dataset_root, store=Store.of(spec.storage),
        )


def listed_documents(request: DatasetRequest) -> pa.Table:
    """The sources' documents (``url``, ``key``, ``size``, ``version``, ``url_key``), each with its
    split and, if the cache has it, its cache entry."""
    listing = list_documents(request.sources, request.store)
    kept = kept_splits(request.keep_splits, listing.column("url_key"), request.store) if request.keep_splits else None
    listing = listing.append_column("split", pa.array(split_array(listing.column("key"), request.val_fraction, kept)))
    found = lookup(listing, load_index(request.dataset_root, request.alphabet, request.store))
    pa.default_memory_pool().release_unused()
    return found


def kept_splits(url: str, keys: pa.ChunkedArray, store: Store = Store()) -> np.ndarray | None:
    """Per ``url_key`` in ``keys``: the split that the table at ``url`` gives it, or "" where it
    lists none; None, with a warning, for a table without splits (a version published before
    they were kept)."""
    table = _read_splits_table(url, store)
    if "split" not in table.column_names:
        log.warning("%s lists no splits (written before they were kept): every document gets its split by "
                    "the rule, and a document trained on may move into validation", redact(url))
        return None
    if "url_key" not in table.column_names:  # written before url_key: the key of the URL it stored
        table = table.append_column("url_key", url_keys(table.column("url")))
    unknown = set(pc.unique(table.column("split")).to_pylist()) - set(SPLITS)
    if unknown:
        raise PipelineError(f"{redact(url)}: unknown splits {sorted(map(str, unknown))} (not {', '.join(SPLITS)}); "
                            f"give DatasetRequest.keep_splits a dataset's or a version's sources.parquet")
    positions = pc.index_in(keys, value_set=table.column("url_key").combine_chunks())
    kept = pc.take(table.column("split").combine_chunks(), positions)
    return pc.fill_null(kept, "").to_numpy(zero_copy_only=False).astype("<U5")


def _read_splits_table(url: str, store: Store) -> pa.Table:
    try:
        fs, path = store.fs(url)
        data = fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - whichever backend raised it
        raise StorageError(f"cannot read the splits to keep: {describe_error(url, exc)}") from None
    try:
        table = pq.read_table(pa.BufferReader(data))
        if "url_key" not in table.column_names and "url" not in table.column_names:
            raise ValueError("it has neither a url_key nor a url column")
        return table
    except Exception as exc:  # noqa: BLE001 - whatever a torn or foreign file makes the reader say
        raise PipelineError(f"{redact(url)}: cannot read the splits to keep ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); give a dataset's or a version's "
                            f"sources.parquet") from None


def encode_groups(documents: pa.Table, cpus: int) -> list[pa.Table]:
    """Documents cut, in URL order, into encode tasks of about equal cost: a few per core, each
    between ``GROUP_MIN_BYTES`` and ``GROUP_BYTES`` (a document costs its size plus ``DOCUMENT_COST``)."""
    if documents.num_rows == 0:
        return []
    cost = np.cumsum(documents.column("size").to_numpy() + DOCUMENT_COST)
    target = np.clip(cost[-1] / (4 * max(cpus, 1)), GROUP_MIN_BYTES, GROUP_BYTES)
    count = int(min(np.ceil(cost[-1] / target), documents.num_rows))
    bounds = np.unique(np.searchsorted(cost, np.linspace(0, cost[-1], count + 1)[1:-1], side="left") + 1)
    bounds = [0, *bounds[bounds < documents.num_rows].tolist(), documents.num_rows]
    return [documents.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


def _encode(missing: pa.Table, request: DatasetRequest) -> pa.Table:
    import ray

    groups = encode_groups(missing, int(ray.cluster_resources().get("CPU", 1)))
    options = {"root": request.dataset_root, "alphabet": request.alphabet, "store": request.store}
    results = run_tasks(encode_group, [((group,), options) for group in groups], "encoding the documents")
    if not results:
        return RESULT.empty_table().select([*FIGURES, "error"])
    figures = pa.concat_tables([r.set_column(1, "blob", r.column("blob").cast(pa.string())) for r in results])
    del results
    return figures


def run_tasks(fn, calls: list[tuple[tuple, dict]], what: str) -> list:
    """``fn(*args, **kwargs)`` for each call, as Ray tasks of one CPU, results in call order.

    Plain tasks, not Ray Data: measured on this job (2 cores, 13 groups of 15,000 documents),
    ``map_batches`` took 10.5 s where these take 5.9 s.  A task whose worker dies (out of
    memory, a lost node) runs at most ``TASK_ATTEMPTS`` times, never for ever."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=TASK_ATTEMPTS - 1)(fn)
    try:
        return ray.get([task.remote(*args, **kwargs) for args, kwargs in calls])
    except ray.exceptions.RayError as exc:
        cause = root_cause(exc)
        if isinstance(cause, CharnnError) and type(cause).__module__.startswith("charnn."):
            raise cause from None  # already one line that names the fix
        text = " ".join(str(exc).split())[-300:]
        raise PipelineError(f"{what} failed after {TASK_ATTEMPTS} attempts: {redact(text)}; give the "
                            f"Ray workers more memory, or leave the largest files out") from None


def catalogue(request: DatasetRequest) -> pa.Table:
    """Every document with its split and cache entry, new or changed ones encoded first."""
    # the keys found the cache entries; the build needs them again only for sources.parquet (64
    # bytes a document: 13 MB of the driver's peak at 200,000 documents)
    found = listed_documents(request).drop_columns(["url_key"])
    missing = pc.is_null(found.column("identity"))
    encoded = _encode(found.select(["url", "size", "version"]).filter(missing), request)  # not a copy of every column
    _raise_first_error(pc.drop_null(encoded.column("error")).to_pylist(), "reading the sources failed")
    found = found.drop_columns(["version"])
    for name in FIGURES:
        column = encoded.column(name)
        if len(column) < found.num_rows:  # some were cached: fill in the others, in place
            column = pc.replace_with_mask(found.column(name).combine_chunks(), missing.combine_chunks(),
                                          column.combine_chunks())
        found = found.set_column(found.schema.get_field_index(name), name, column)
    del encoded
    documents = found.append_column("reused", pc.invert(missing))
    _check_documents(documents, request.alphabet)
    pa.default_memory_pool().release_unused()  # the joins' scratch memory goes back to the system
    return documents


def _pieces(documents: pa.Table, split: str, val_fraction: float) -> tuple[np.ndarray, ...]:
    """(document rows, first code, codes) of the split's stream, in URL order."""
    splits = documents.column("split")
    tokens = documents.column("tokens").to_numpy()
    rows = np.flatnonzero(pc.is_in(splits, pa.array([split, "both"])).to_numpy(zero_copy_only=False))
    first, length = np.zeros(len(rows), np.int64), tokens[rows].copy()
    both = pc.equal(splits, "both").to_numpy(zero_copy_only=False)[rows]
    cut = tokens[rows][both] - (tokens[rows][both] * val_fraction).astype(np.int64)
    if split == "train":
        length[both] = cut
    else:
        first[both], length[both] = cut, tokens[rows][both] - cut
    return rows, first, length


def stream_of(documents: pa.Table, split: str, request: DatasetRequest) -> Stream:
    blobs = pc.dictionary_encode(documents.column("blob")).combine_chunks()
    base = cache_url(request.dataset_root, request.alphabet)
    rows, first, length = _pieces(documents, split, request.val_fraction)
    offsets = documents.column("offset").to_numpy()
    return Stream.of([join(base, "blobs", f"{b}.u8") for b in blobs.dictionary.to_pylist()],
                     blobs.indices.to_numpy()[rows], offsets[rows] + first, length)


def dataset_key(request: DatasetRequest, documents: pa.Table) -> str:
    """The dataset directory's name: a hash of everything that decides its content, each
    document's split included (splits kept from a published version may differ from the rule's)."""
    digest = hashlib.sha256(json.dumps({
        "format": FORMAT, "alphabet": request.alphabet, "seq_len": request.seq_len, "rows": request.rows,
        "workers": request.workers, "val_fraction": request.val_fraction, "shard_mb": request.shard_mb,
        "split_rule": SPLIT_RULE}, sort_keys=True).encode())
    for batch in documents.select(["url", "identity", "split"]).to_batches(CHUNK_ROWS):
        for url, identity, split in zip(*(column.to_pylist() for column in batch.columns)):
            digest.update(f"{url}\0{identity}\0{split}\n".encode())
    return digest.hexdigest()[:16]


def _layouts(request: DatasetRequest, streams: dict[str, Stream]) -> dict[str, Layout]:
    try:
        train = plan_rows(streams["train"].tokens, request.rows, request.seq_len)
        val_rows = validation_rows(streams["val"].tokens, request.rows, request.seq_len, request.workers)
        return {"train": train, "val": plan_rows(streams["val"].tokens, val_rows, request.seq_len)}
    except LayoutError as exc:
        raise PipelineError(str(exc)) from None


def build_dataset(request: DatasetRequest) -> str:
    """URL of the dataset directory for ``request``, built unless it exists already."""
    started = time.perf_counter()
    alphabet_size(request.alphabet)
    if request.workers <= 0 or request.rows % request.workers:
        raise PipelineError(f"{request.rows} rows cannot be split evenly over {request.workers} workers")
    documents = catalogue(request)
    catalogued = time.perf_counter()
    url, splits = write_dataset(request, documents)
    if splits is not None:
        _summarise(documents, splits, catalogued - started, time.perf_counter() - catalogued)
    return url


def write_dataset(request: DatasetRequest, documents: pa.Table) -> tuple[str, dict[str, Split] | None]:
    """The dataset of catalogued ``documents``: its URL, and its splits unless it existed already."""
    streams = {split: stream_of(documents, split, request) for split in ("train", "val")}
    layouts = _layouts(request, streams)
    url = join(request.dataset_root, dataset_key(request, documents))
    with dataset_root_access(url, "write the dataset"):
        fs, manifest_path = request.store.fs(join(url, "manifest.json"))
        if fs.exists(manifest_path):
            log.info("dataset %s exists; reusing it", url)
            return url, None
        fs.makedirs(manifest_path.rsplit("/", 1)[0], exist_ok=True)
    splits = _write_shards(request, streams, layouts, url)
    # URLs masked (the dataset holds no credentials) beside the key of each raw URL (what comparisons go by)
    sources = documents.set_column(documents.schema.get_field_index("url"), "url", redact_urls(documents.column("url")))
    sources = sources.append_column("url_key", url_keys(documents.column("url")))
    manifest = Manifest(request.alphabet, alphabet_size(request.alphabet), request.seq_len, request.workers,
                        SPLIT_RULE, request.val_fraction, documents.num_rows, splits)
    with dataset_root_access(url, "write the dataset"):
        write_sources(url, sources, request.store)
        write_manifest(url, dataclasses.replace(manifest, stream=stream_digest(manifest, documents)), request.store)
    return url, splits


def _write_shards(request: DatasetRequest, streams: dict[str, Stream], layouts: dict[str, Layout],
                  url: str) -> dict[str, Split]:
    import ray

    splits, tasks = {}, []
    for split, layout in layouts.items():
        plans = plan_shards(layout, request.workers, request.shard_mb * 2**20)
        splits[split] = Split(layout.rows, layout.row_length, layout.steps, streams[split].tokens,
                              tuple(_shard(plan, split) for plan in plans))
        tasks += [{"url": join(url, plan.name(split)), "split": split, "rows": [plan.rows.start, plan.rows.stop],
                   "steps": [plan.steps.start, plan.steps.stop], "seq_len": layout.seq_len,
                   "row_length": layout.row_length} for plan in plans]
    streams_ref = ray.put(streams)
    written = run_tasks(write_shard, [((task, streams_ref, request.store), {}) for task in tasks],
                        f"writing shards under {url}")
    _raise_first_error([w["error"] for w in written], f"writing shards under {url} failed")
    return splits


def _shard(plan: ShardPlan, split: str) -> Shard:
    return Shard(plan.name(split), plan.worker, (plan.rows.start, plan.rows.stop), (plan.steps.start, plan.steps.stop))


def write_shard(task: dict, streams, store: Store = Store()) -> dict:
    """Ray task: cut one worker's step range out of its rows and write it as Arrow IPC."""
    try:
        T, L = task["seq_len"], task["row_length"]
        s0, s1 = task["steps"]
        rows = range(*task["rows"])
        reader = BlobReader(streams[task["split"]], store)
        segments = [reader.read(r * L + s0 * T, r * L + s1 * T + 1) for r in rows]
        fs, path = store.fs(task["url"])
        with open_atomic(fs, path) as f:  # synced: the manifest will vouch for it
            write_shard_file(f, shard_table(rows, s0 * T, segments))
        return {"url": task["url"], "error": ""}
    except Exception as exc:  # noqa: BLE001 - any backend error is reported by the driver
        return {"url": task["url"], "error": describe_error(task["url"], exc)}


def _check_documents(documents: pa.Table, alphabet: str) -> None:
    if pc.sum(documents.column("tokens")).as_py() in (None, 0):
        raise PipelineError("the corpus is empty: every source file has 0 bytes; point data.sources at text")
    suspicious = documents.filter(pc.greater(documents.column("unknown"), UNKNOWN_WARNING))
    for url, unknown in zip(suspicious.column("url").to_pylist()[:WARNINGS_SHOWN],
                            suspicious.column("unknown").to_pylist()):
        log.warning("%s: %.0f%% of its characters are outside %s; is it a binary file?",
                    redact(url), 100 * unknown, alphabet)
    if suspicious.num_rows > WARNINGS_SHOWN:
        log.warning("... and %d more documents like these", suspicious.num_rows - WARNINGS_SHOWN)


def _summarise(documents: pa.Table, splits: dict[str, Split], catalogued: float, written: float) -> None:
    mb = pc.sum(documents.column("size")).as_py() / 1e6
    reused = pc.sum(documents.column("reused").cast(pa.int64())).as_py()
    train, val, seconds = splits["train"], splits["val"], catalogued + written
    print(
        f"charnn.pipeline: {documents.num_rows} documents ({reused} reused from cache), {mb:.1f} MB, "
        f"{pc.sum(documents.column('tokens')).as_py()} tokens; train {train.rows} rows x {train.row_length}, "
        f"val {val.rows} rows x {val.row_length}; {seconds:.1f} s (listing and encoding {catalogued:.1f} s, "
        f"shards {written:.1f} s), {mb / max(seconds, 1e-9):.1f} MB/s",
        file=sys.stderr, flush=True,
    )


def _raise_first_error(errors: list, what: str) -> None:
    failed = [e for e in errors if e]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise PipelineError(f"{what}: {failed[0]}{more}")
