"""The Ray Data job: sources -> the document cache -> row shards -> sources table -> manifest.

The driver lists the sources and looks every document up in the cache index; it holds a few
Arrow columns per document, never the documents.  Documents that are new or changed are
encoded by a Ray Data read (``operators.EncodeSource``), one read task per group of up to
``GROUP_BYTES`` of input (many small files, or one large one), each writing one cache blob.
The driver lays the rows out (a prefix sum over the documents' token counts: Ray Data has no
scan), then a Ray Data write (``operators.ShardSink``) writes the shards, a task per shard,
each reading only the pieces of the cache that its rows cover.  ``manifest.json`` is written
last, by the sink's ``on_write_complete``, so a dataset directory without it does not exist
for any reader.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from charnn.config import fields_with_role, role_settings
from charnn.errors import CharnnError, UserError, root_cause
from charnn.data.alphabet import alphabet_size
from charnn.data.cache import FIGURES, RESULT, cache_url, dataset_root_access, load_index, lookup
from charnn.data.dataset import (FORMAT, SEGMENT, SEGMENTS, Manifest, SegmentRecord, SegmentRef, Shard, Split,
                                  content_digest, load_segment, newest_version, stream_digest, version_numbers,
                                  version_url, write_segment, write_version)
from charnn.data.segments import document_keys, flatten, plan_growth
from charnn.data.layout import Layout, LayoutError, ShardPlan, plan_rows, plan_shards, validation_rows
from charnn.data.sources import SPLIT_RULE, list_documents, split_array, url_keys
from charnn.data.operators import EncodeSource, ShardPlanRow, StageOptions, in_listing_order
from charnn.data.runners import TaskRunner, stage_runner
from charnn.storage import StorageError, Store, describe_error, join, redact, redact_urls
from charnn.data.stream import Stream

GROUP_BYTES = 128 * 2**20  # an encode task's cost, at most (a single larger document is a task of its own)
GROUP_MIN_BYTES = 4 * 2**20  # ... and at least, unless the corpus costs less
DOCUMENT_COST = 8 * 2**10  # what opening and reading one more file costs, in bytes read
UNKNOWN_WARNING = 0.05  # gorner98 codes that are "unknown" above this share: probably not text
WARNINGS_SHOWN = 5
SPLITS = ("train", "val", "both")
# what Ray Data appends to a task's error ("Failed to apply UDF transform after 1/3 attempts ..."),
# escaped ("\\n") once the error is one of charnn's one-line errors
RAY_DATA_RETRY_NOTE = re.compile(r"(\n|\\n)Failed to .* after \d+/\d+ attempts.*$", re.S)

log = logging.getLogger("charnn.pipeline")


class PipelineError(UserError):
    """A dataset that cannot be built; the message names the cause and the fix."""


@dataclass(frozen=True)
class DatasetRequest:
    """Everything that determines a dataset's content.  ``from_spec`` fills the fields named as the
    spec's dataset-role data keys (charnn.config), and they name the dataset (``dataset_settings``)."""

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
    stage: StageOptions = StageOptions()  # where and how the pipeline's tasks run; not the dataset's content

    @classmethod
    def from_spec(cls, spec) -> "DatasetRequest":
        # the spec's dataset-role data keys (charnn.config) reach the fields of their names
        settings = {dotted.removeprefix("data."): value for dotted, value in role_settings(spec, "dataset").items()
                    if dotted not in _FROM_SPEC}
        return cls(
            sources=list(spec.data.sources), rows=spec.cluster.num_workers * spec.train.batch_per_worker,
            workers=spec.cluster.num_workers, **settings, dataset_root=spec.data.dataset_root,
            store=Store.of(spec.storage), stage=StageOptions(spec.data.max_concurrency,
                                                         in_process_bytes=spec.data.in_process_mb * 2**20),
        )


# The request's fields that the dataset-role keys outside the data section make: R and W.
_FROM_SPEC = {"train.batch_per_worker": "rows", "cluster.num_workers": "workers"}
# Dataset settings that decide how the rows are stored, not which rows: a segment's name leaves them
# out, and so does the stream digest (charnn.data.dataset.stream_digest).
STORAGE_ONLY = ("workers", "shard_mb")


def listed_documents(request: DatasetRequest, laid_out: pa.Table | None = None) -> pa.Table:
    """The sources' documents (``url``, ``key``, ``size``, ``version``, ``url_key``), each with its
    split and, if the cache has it, its cache entry.  A document keeps the split that
    ``request.keep_splits`` gives it, else the one it has in ``laid_out`` (the dataset's newest
    version's sources), else the rule's."""
    listing = list_documents(request.sources, request.store)
    keys = listing.column("url_key")
    kept = kept_splits(request.keep_splits, keys, request.store) if request.keep_splits else None
    if laid_out is not None and laid_out.num_rows:
        ours = _kept_from(laid_out, keys)
        kept = ours if kept is None else np.where(kept != "", kept, ours)
    listing = listing.append_column("split", pa.array(split_array(listing.column("key"), request.val_fraction, kept)))
    found = lookup(listing, load_index(request.dataset_root, request.alphabet, request.store))
    pa.default_memory_pool().release_unused()
    return found


def kept_splits(url: str, keys: pa.ChunkedArray, store: Store) -> np.ndarray | None:
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
    return _kept_from(table, keys)


def _kept_from(table: pa.Table, keys: pa.ChunkedArray) -> np.ndarray:
    """Per key: the split ``table`` (``url_key``, ``split``) gives it, or ""."""
    positions = pc.index_in(keys, value_set=table.column("url_key").combine_chunks())
    kept = pc.take(table.column("split").combine_chunks(), positions)
    return pc.fill_null(kept, "").to_numpy(zero_copy_only=False).astype("<U5")


def _read_splits_table(url: str, store: Store) -> pa.Table:
    try:
        data = store.read(url)
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


def encode_documents(missing: pa.Table, request: DatasetRequest) -> pa.Table:
    """The figures of every ``missing`` document, in its order: the read of ``EncodeSource``, by
    the stage's runner (``charnn.data.runners``)."""
    if missing.num_rows == 0:
        return RESULT.empty_table().select([*FIGURES, "error"])
    runner = stage_runner(request.stage, pc.sum(missing.column("size")).as_py())
    groups = encode_groups(missing, runner.cpus())
    source = EncodeSource(groups, request.dataset_root, request.alphabet, request.store)
    with _stage("encoding the documents"):
        figures = in_listing_order(runner.encode(source, request.stage))
    return figures.set_column(1, "blob", figures.column("blob").cast(pa.string()))


@contextlib.contextmanager
def _stage(what: str):
    """A Ray Data stage's failure as one line: a task's own charnn error as it is, anything else
    with what to do."""
    import ray
    import ray.data

    try:
        yield
    except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as exc:
        cause = root_cause(exc)
        if isinstance(cause, CharnnError) and type(cause).__module__.startswith("charnn."):
            raise type(cause)(RAY_DATA_RETRY_NOTE.sub("", str(cause))) from None  # already names the fix
        text = " ".join(str(cause).split())[-300:]
        raise PipelineError(f"{what} failed: {redact(text)}; give the "
                            f"Ray workers more memory, or leave the largest files out") from None


def catalogue(request: DatasetRequest, laid_out: pa.Table | None = None) -> pa.Table:
    """Every document with its split and cache entry, new or changed ones encoded first (splits
    as ``listed_documents`` gives them)."""
    found = listed_documents(request, laid_out)
    missing = pc.is_null(found.column("identity"))
    # only the columns the encode tasks need, not a copy of every column
    encoded = encode_documents(found.select(["url", "size", "version"]).filter(missing), request)
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


def dataset_settings(request: DatasetRequest) -> dict:
    """What names the request's dataset: its fields for the spec's dataset-role keys (charnn.config).
    A field with a default names it only where it differs, so that a setting added later leaves the
    datasets built before it (as its default builds them) where they are."""
    names = sorted(_FROM_SPEC.get(dotted, dotted.removeprefix("data.")) for dotted in fields_with_role("dataset"))
    defaults = {f.name: f.default for f in dataclasses.fields(request)}
    return {name: getattr(request, name) for name in names if getattr(request, name) != defaults[name]}


def dataset_directory(request: DatasetRequest) -> str:
    """The dataset directory: named by what decides its layout, not by its documents (a corpus that
    grows adds versions to the same directory)."""
    digest = hashlib.sha256(json.dumps({
        "format": FORMAT, **dataset_settings(request), "split_rule": SPLIT_RULE}, sort_keys=True).encode())
    return join(request.dataset_root, digest.hexdigest()[:16])


def segment_id(request: DatasetRequest, val_rows: int, documents: pa.Table) -> str:
    """A segment's name: a hash of what decides its rows (not W, nor where it is stored, so that a
    run resumes on another number of workers or a moved dataset) and its documents in order."""
    rows = {k: v for k, v in dataset_settings(request).items() if k not in STORAGE_ONLY}
    digest = hashlib.sha256(json.dumps({**rows, "val_rows": val_rows, "split_rule": SPLIT_RULE},
                                       sort_keys=True).encode())
    for key in document_keys(documents).to_pylist():
        digest.update(f"{key}\n".encode())
    return digest.hexdigest()[:16]


def _lay_out(free: pa.Table, request: DatasetRequest, val_rows: int | None) -> dict[str, Layout]:
    """The layouts of the free documents' splits that fill a step; for a dataset's first version
    both must (else the corpus is too small), later a split that does not waits."""
    tokens = {split: int(_pieces(free, split, request.val_fraction)[2].sum()) for split in ("train", "val")}
    try:
        if val_rows is None:
            val_rows = validation_rows(tokens["val"], request.rows, request.seq_len, request.workers)
            return {"train": plan_rows(tokens["train"], request.rows, request.seq_len),
                    "val": plan_rows(tokens["val"], val_rows, request.seq_len)}
    except LayoutError as exc:
        raise PipelineError(str(exc)) from None
    layouts = {}
    for split, rows in (("train", request.rows), ("val", val_rows)):
        with contextlib.suppress(LayoutError):
            layouts[split] = plan_rows(tokens[split], rows, request.seq_len)
    both = pc.any(pc.equal(free.column("split"), "both")).as_py()
    return layouts if len(layouts) == 2 or not both else {}  # a document in both splits waits for both


def build_dataset(request: DatasetRequest, runner: TaskRunner | None = None) -> Manifest:
    """The newest version of the dataset for ``request`` (its manifest), with a new segment for the
    documents that no version holds yet (see ``charnn.data.segments``); its tasks run on ``runner``
    (``charnn.data.runners``: without one, each stage on ``default_runner``'s for its input)."""
    if runner is not None:
        request = dataclasses.replace(request, stage=dataclasses.replace(request.stage, runner=runner))
    started = time.perf_counter()
    alphabet_size(request.alphabet)
    if request.workers <= 0 or request.rows % request.workers:
        raise PipelineError(f"{request.rows} rows cannot be split evenly over {request.workers} workers")
    directory = dataset_directory(request)
    with dataset_root_access(directory, "read the dataset"):
        previous = newest_version(directory, request.store)
        laid_out = previous and previous.sources(request.store)
    documents = catalogue(request, laid_out)
    catalogued = time.perf_counter()
    manifest, added = write_dataset(request, documents, previous, laid_out)
    if added is not None:
        _summarise(documents, added, catalogued - started, time.perf_counter() - catalogued)
    return manifest


def write_dataset(request: DatasetRequest, documents: pa.Table, previous: Manifest | None = None,
                  laid_out: pa.Table | None = None) -> tuple[Manifest, "Added | None"]:
    """The newest version for the catalogued ``documents``: its manifest and what this build added
    (None if ``previous``, the newest version so far, whose sources are ``laid_out``, holds them
    already)."""
    directory = dataset_directory(request)
    store = request.store
    growth = plan_growth(documents, previous.segments if previous else (), laid_out)
    free = documents.filter(growth.free)
    layouts = _lay_out(free, request, previous and previous.splits["val"].rows)
    if previous and not layouts and not growth.dropped:
        log.info("dataset %s holds every listed document (%d wait for more text)", previous.url, free.num_rows)
        return previous, None
    placed = pc.is_in(free.column("split"),
                      pa.array([*layouts, "both"] if len(layouts) == 2 else list(layouts), pa.string()))
    segment = free.filter(placed)
    added = Added(free.num_rows - segment.num_rows, segment, {})
    val_rows = previous.splits["val"].rows if previous else layouts["val"].rows
    with dataset_root_access(directory, "read the dataset"):
        with ThreadPoolExecutor(16) as pool:  # one small read each: many segments on an object store
            records = list(pool.map(lambda ref: _record(directory, ref, store), growth.kept))
        number = max(version_numbers(directory, store), default=0) + 1
        new_id = segment_id(request, val_rows, segment)
        written = load_segment(directory, new_id, store) if layouts else None  # a build that died after it

    made = []  # the version's manifest, once commit has written it

    def commit(splits: dict[str, Split]) -> None:
        if splits:
            record = written or SegmentRecord(new_id, segment.num_rows, splits, content_digest(segment))
            # a segment a dead build left is written again too: that makes it young, which gc leaves alone
            write_segment(directory, record, _sources_table(segment), store)
            records.append(record)
        added.splits.update(splits)
        made.append(_write_version(request, directory, number, records, {"train": request.rows, "val": val_rows},
                                   added.waiting))

    if not layouts or written:
        with dataset_root_access(directory, "write the dataset"):
            commit(written.splits if written else {})
        return made[0], added
    streams = {split: stream_of(segment, split, request) for split in ("train", "val")}
    _write_shards(request, streams, layouts, join(directory, SEGMENTS, new_id), commit)
    return made[0], added


@dataclass
class Added:
    """What a build added: the new segment's documents and splits, and how many documents wait."""

    waiting: int
    documents: pa.Table
    splits: dict[str, Split]


def _record(directory: str, ref: SegmentRef, store: Store) -> SegmentRecord:
    record = load_segment(directory, ref.id, store)
    if record is None:
        raise PipelineError(f"{join(directory, SEGMENTS, ref.id)} has no {SEGMENT}, yet a version names it: "
                            f"it was damaged; delete {directory} and build again")
    return record


def _sources_table(documents: pa.Table) -> pa.Table:
    # URLs masked (the dataset holds no credentials) beside the key of each raw URL (what comparisons go by)
    return documents.set_column(documents.schema.get_field_index("url"), "url", redact_urls(documents.column("url")))


def _write_version(request: DatasetRequest, directory: str, number: int, records: list[SegmentRecord],
                   rows: dict[str, int], waiting: int) -> Manifest:
    manifest = Manifest(request.alphabet, alphabet_size(request.alphabet), request.seq_len, request.workers,
                        SPLIT_RULE, request.val_fraction, sum(r.documents for r in records),
                        flatten(records, rows, request.seq_len), url=version_url(directory, number),
                        segments=tuple(r.ref() for r in records), version=number, waiting=waiting)
    empty = [name for name, split in manifest.splits.items() if not split.steps]
    if empty:
        raise PipelineError(f"the corpus is too small: no step of {' or '.join(empty)} is left once the removed "
                            f"documents are gone; add text")
    manifest = dataclasses.replace(manifest, stream=stream_digest(manifest, None))
    if not write_version(manifest, request.store):
        raise PipelineError(f"{manifest.url} was written by another build meanwhile; run the job again")
    return manifest


def _write_shards(request: DatasetRequest, streams: dict[str, Stream], layouts: dict[str, Layout],
                  url: str, commit) -> None:
    """Every shard of the laid-out splits under ``url``, written by the stage's runner (Ray Data's
    write of ``ShardSink``, or this process); ``commit(splits)`` runs once all are whole (a split
    not laid out has no rows there)."""
    splits, plans = {}, []
    for split in ("train", "val"):
        layout = layouts.get(split)
        if layout is None:
            splits[split] = Split(0, 0, 0, 0, ())
            continue
        shards = plan_shards(layout, request.workers, request.shard_mb * 2**20)
        splits[split] = Split(layout.rows, layout.row_length, layout.steps, streams[split].tokens,
                              tuple(_shard(plan, split) for plan in shards))
        plans += [ShardPlanRow(join(url, plan.name(split)), split, plan.rows.start, plan.rows.stop,
                               plan.steps.start, plan.steps.stop, layout.seq_len, layout.row_length)
                  for plan in shards]

    def committed(errors: list[str]) -> None:
        _raise_first_error(errors, f"writing shards under {url} failed")
        commit(splits)

    runner = stage_runner(request.stage, sum(stream.tokens for stream in streams.values()))
    with _stage(f"writing shards under {url}"):
        runner.write_shards(plans, streams, request.store, committed, request.stage)


def _shard(plan: ShardPlan, split: str) -> Shard:
    return Shard(plan.name(split), plan.worker, (plan.rows.start, plan.rows.stop), (plan.steps.start, plan.steps.stop))


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


def _summarise(documents: pa.Table, added: Added, catalogued: float, written: float) -> None:
    mb = pc.sum(documents.column("size")).as_py() / 1e6
    reused = pc.sum(documents.column("reused").cast(pa.int64())).as_py()
    new = added.documents
    segment = ", ".join(f"{name} {split.rows} rows x {split.row_length}" for name, split in added.splits.items()
                        if split.steps) or "no new segment"
    seconds = catalogued + written
    print(
        f"charnn.pipeline: {documents.num_rows} documents ({reused} reused from cache), {mb:.1f} MB; "
        f"laid out {new.num_rows} documents, {pc.sum(new.column('tokens')).as_py() or 0} tokens, as a new segment "
        f"({segment}); {added.waiting} wait for more text; {seconds:.1f} s (listing and encoding {catalogued:.1f} s, "
        f"shards {written:.1f} s), {mb / max(seconds, 1e-9):.1f} MB/s",
        file=sys.stderr, flush=True,
    )


def _raise_first_error(errors: list, what: str) -> None:
    failed = [e for e in errors if e]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise PipelineError(f"{what}: {failed[0]}{more}")
