"""The pipeline's Ray Data operators: the encode stage's read, the shard stage's sink, and a
built dataset's rows as a ``ray.data.Dataset``.

Ray Data pays its overhead per task and per block, so each operator works on large units:
a read task encodes a whole group of documents (``build.encode_groups``: many small files, or
one large one) and yields one small block of figures; a write task writes whole shards.  No
document is ever a block or a task of its own.  A task whose worker dies (a lost node, a
killed process) is retried by Ray Data, which retries system failures and nothing else; a
document that cannot be read is a row's ``error``, reported by the driver, never retried, and
any other error of a task (an unreachable ``data.dataset_root``) ends the stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask

from charnn.data.cache import encode_group
from charnn.data.dataset import DatasetError, Manifest, Split, load_manifest, shard_table, write_shard_file
from charnn.data.stream import BlobReader, Stream
from charnn.storage import Store, describe_error

if TYPE_CHECKING:
    from charnn.data.runners import TaskRunner  # which imports this module

FIGURE_BYTES = 96  # an encoded document's row of figures, about


@dataclass(frozen=True)
class StageOptions:
    """How the pipeline's operators run: where (``runner``, a ``charnn.data.runners.TaskRunner``;
    None: as ``runners.default_runner`` chooses for a stage's input and ``in_process_bytes``,
    ``data.in_process_mb``) and, as Ray Data tasks, at most ``concurrency``
    (``data.max_concurrency``; None lets Ray Data decide from the cluster's free CPUs) at once, of
    one CPU each."""

    concurrency: int | None = None
    runner: TaskRunner | None = None
    in_process_bytes: int = 64 * 2**20


def read(source, stage: StageOptions):
    """``ray.data.read_datasource`` of ``source``, one block per read task (Ray Data would
    otherwise split small outputs to reach its default parallelism)."""
    import ray.data

    return unreserved(ray.data.read_datasource(source, concurrency=stage.concurrency,
                                               override_num_blocks=source.read_tasks))


def unreserved(dataset):
    """``dataset`` without Ray Data's per-operator resource reservation.  It keeps part of the
    CPUs for operators downstream; the pipeline's datasets have one operator each, and with it
    on 2 CPUs ran one task at a time (on 8 CPUs, 2)."""
    dataset.context.op_resource_reservation_enabled = False
    return dataset


class EncodeSource(Datasource):
    """The encode stage as a Ray Data read: one read task per group of documents, which encodes
    the group into one new cache blob, indexes it, and yields the group's figures (``FIGURES``,
    ``error``) with each document's ``position`` in the listing (Ray Data keeps no order)."""

    def __init__(self, groups: list[pa.Table], root: str, alphabet: str, store: Store):
        self.groups, self.root, self.alphabet, self.store = groups, root, alphabet, store
        self.refs = None

    def get_name(self) -> str:
        return "EncodeDocuments"

    @property
    def read_tasks(self) -> int:
        return len(self.groups)

    def estimate_inmemory_data_size(self) -> int:
        return sum(group.num_rows for group in self.groups) * FIGURE_BYTES

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        import ray

        if self.refs is None:  # Ray Data asks for the read tasks several times: each group is put once
            # a group goes through the object store: a read task itself stays a few hundred bytes
            self.refs = [ray.put(group) for group in self.groups]
        tasks, first = [], 0
        for group, ref in zip(self.groups, self.refs):
            read = _encode_task(ref, first, self.root, self.alphabet, self.store)
            meta = BlockMetadata(num_rows=group.num_rows, size_bytes=group.num_rows * FIGURE_BYTES,
                                 input_files=None, exec_stats=None)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            first += group.num_rows
        return tasks

    def blocks_in_process(self) -> Iterator[pa.Table]:
        """The read tasks' blocks, each group encoded in turn in this process (``runners.InProcess``)."""
        first = 0
        for group in self.groups:
            yield encode_block(group, first, self.root, self.alphabet, self.store)
            first += group.num_rows


def encode_block(group: pa.Table, first: int, root: str, alphabet: str, store: Store) -> pa.Table:
    """A read task's work: the group encoded into one cache blob, and its figures, each with its
    document's ``position`` in the listing (``first`` is the group's first)."""
    figures = encode_group(group, root, alphabet, store)
    return figures.append_column("position", pa.array(np.arange(first, first + group.num_rows), pa.int64()))


def _encode_task(group_ref, first: int, root: str, alphabet: str, store: Store):
    def encode_documents() -> Iterable[pa.Table]:
        import ray

        yield encode_block(ray.get(group_ref), first, root, alphabet, store)

    return encode_documents


def in_listing_order(blocks: Iterable[pa.Table]) -> pa.Table:
    """The encode stage's output blocks as one table in the listing's order, ``position`` dropped.

    Each block is a run of consecutive positions (a group, or a piece of one), so ordering the
    blocks orders the rows, without a copy of the table."""
    ordered = sorted((b for b in blocks if b.num_rows), key=lambda b: b.column("position")[0].as_py())
    table = pa.concat_tables(ordered, promote_options="permissive")
    if not np.array_equal(table.column("position").to_numpy(), np.arange(table.num_rows)):
        raise RuntimeError("the encode stage's blocks are not runs of consecutive documents")
    return table.drop_columns(["position"])


@dataclass(frozen=True)
class ShardPlanRow:
    """One shard to write: which split, which rows and steps, and where."""

    url: str
    split: str
    row_first: int
    row_stop: int
    step_first: int
    step_stop: int
    seq_len: int
    row_length: int


class ShardSink(Datasink):
    """The shard stage as a Ray Data write: each write task cuts its shards (``ShardPlanRow``
    rows) out of the split's stream, read from the document cache, and writes them atomically;
    ``on_write_complete`` (on the driver, once every shard is whole) runs ``commit``, which
    writes the sources table and then ``manifest.json``: a dataset without it exists for no reader."""

    def __init__(self, streams: dict[str, Stream], store: Store, commit):
        import ray

        self.streams_ref, self.store, self.commit = ray.put(streams), store, commit

    def get_name(self) -> str:
        return "WriteShards"

    def __getstate__(self) -> dict:
        # what the write tasks get: ``commit`` runs on the driver, and holds the catalogue
        return {**self.__dict__, "commit": None}

    def write(self, blocks: Iterable, ctx) -> list[str]:
        import ray

        streams = ray.get(self.streams_ref)
        return [write_shard(ShardPlanRow(**row), streams, self.store)
                for block in blocks for row in BlockAccessor.for_block(block).to_arrow().to_pylist()]

    def on_write_complete(self, write_result) -> None:
        self.commit([error for errors in write_result.write_returns for error in errors if error])


def write_shard(plan: ShardPlanRow, streams: dict[str, Stream], store: Store) -> str:
    """Cut one worker's step range out of its rows and write it as Arrow IPC: "" or one line."""
    try:
        T, L = plan.seq_len, plan.row_length
        reader = BlobReader(streams[plan.split], store)
        rows = range(plan.row_first, plan.row_stop)
        tokens = np.empty((len(rows), (plan.step_stop - plan.step_first) * T + 1), np.uint8)
        for i, r in enumerate(rows):
            reader.read_into(tokens[i], r * L + plan.step_first * T)
        with store.open_atomic(plan.url) as f:  # synced: the manifest will vouch for it
            write_shard_file(f, shard_table(rows, plan.step_first * T, tokens))
        return ""
    except Exception as exc:  # noqa: BLE001 - any backend error is reported by the driver
        return describe_error(plan.url, exc)


class ShardSource(Datasource):
    """A built dataset's shards of one split as a Ray Data read: one read task per shard, each
    yielding its rows (``row``, ``start``, ``tokens``) with the ``worker`` that trains on them."""

    def __init__(self, manifest: Manifest, split: Split, store: Store):
        self.manifest, self.split, self.store = manifest, split, store

    def get_name(self) -> str:
        return "ReadShards"

    @property
    def read_tasks(self) -> int:
        return len(self.split.shards)

    def estimate_inmemory_data_size(self) -> int:
        return self.split.rows * (self.split.row_length + len(self.split.shards))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        T = self.manifest.seq_len
        return [ReadTask(_shard_task(self.manifest.shard_url(shard), shard.worker, shard.steps[0] * T, self.store),
                         BlockMetadata(num_rows=(rows := shard.rows[1] - shard.rows[0]),
                                       size_bytes=rows * (shard.steps[1] - shard.steps[0]) * T,
                                       input_files=[shard.path], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for shard in self.split.shards]


def _shard_task(url: str, worker: int, start: int, store: Store):
    def read_shard() -> Iterable[pa.Table]:
        with store.open(url) as f:
            table = pa.ipc.open_file(f).read_all()
        # a segment's shard counts its start from the segment's: the version's row counts from its own
        table = table.set_column(1, "start", pa.array(np.full(table.num_rows, start, np.int64)))
        yield table.append_column("worker", pa.array(np.full(table.num_rows, worker, np.int32)))

    return read_shard


def open_dataset(url: str, split: str = "train", store: Store = Store()):
    """The rows of a built dataset's ``split`` as a ``ray.data.Dataset`` (``row``, ``start``,
    ``tokens``, ``worker``): one record per row and shard, for inspection, statistics and
    previews.  Training reads its own rows with ``charnn.data.reader.SplitReader`` instead."""
    manifest = load_manifest(url, store)
    if split not in manifest.splits:
        raise DatasetError(f"{url} has no split {split!r}; choose one of {', '.join(manifest.splits)}")
    return read(ShardSource(manifest, manifest.splits[split], store), StageOptions())
