"""A rank's ordered ``[B, T+1]`` step windows, read from the shards that hold its rows, with read-ahead.

A rank of the group the dataset was laid out for reads its own shards.  A rank of a smaller or
larger group (elastic training: the same R rows over another number of workers) owns another
run of rows; it reads them from the shards of every laid-out worker that holds some of them,
step by step side by side."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from charnn.data.dataset import DatasetError, Manifest, Shard
from charnn.data.layout import worker_rows
from charnn.storage import Store


@dataclass
class SplitReader:
    """Windows of the rows that ``rank`` of ``world`` owns in one split, step by step."""

    url: str
    manifest: Manifest
    split: str
    rank: int
    world: int
    store: Store = Store()

    def __post_init__(self):
        info = self.manifest.splits[self.split]
        self.rows = worker_rows(info.rows, self.world, self.rank)
        self.steps = info.steps
        self.seq_len = self.manifest.seq_len
        layout_world = self.manifest.workers
        # the laid-out workers that hold some of these rows, each with its rows and shards
        self.sources = []
        for worker in range(layout_world):
            held = worker_rows(info.rows, layout_world, worker)
            if held.start < self.rows.stop and self.rows.start < held.stop:
                self.sources.append((held, [s for s in info.shards if s.worker == worker]))

    def _load(self, shard: Shard, held: range) -> np.ndarray:
        """The rows of ``shard`` (which holds ``held``) that this rank owns: [rows, steps*T + 1]."""
        with self.store.open(self.manifest.shard_url(shard)) as f:
            table = pa.ipc.open_file(f).read_all()
        rows = table.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(held.start, held.stop)):
            raise DatasetError(f"{shard.path} holds rows {rows[:3]}..., not {held}")
        tokens = table.column("tokens").combine_chunks().values.to_numpy().reshape(len(rows), -1)
        first, stop = max(held.start, self.rows.start), min(held.stop, self.rows.stop)
        return tokens[first - held.start : stop - held.start]

    def windows(self, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(step, uint8 array [B, T+1]) for every step from ``start_step`` to the split's end."""
        streams = [self._source_windows(held, shards, start_step) for held, shards in self.sources]
        if len(streams) == 1:  # the laid-out group: one source, no copy
            yield from streams[0]
            return
        for parts in zip(*streams):
            yield parts[0][0], np.concatenate([window for _, window in parts])

    def _source_windows(self, held: range, shards: list[Shard], start_step: int) -> Iterator[tuple[int, np.ndarray]]:
        """(step, window) of this rank's rows among ``held``, from ``shards`` (one laid-out worker's)."""
        T = self.seq_len
        shards = [s for s in shards if s.steps[1] > start_step]
        with ThreadPoolExecutor(1, thread_name_prefix="charnn-read-ahead") as pool:
            pending = pool.submit(self._load, shards[0], held) if shards else None
            for i, shard in enumerate(shards):
                block = pending.result()
                pending = pool.submit(self._load, shards[i + 1], held) if i + 1 < len(shards) else None
                first = shard.steps[0]
                for step in range(max(first, start_step), shard.steps[1]):
                    offset = (step - first) * T
                    yield step, block[:, offset : offset + T + 1]
