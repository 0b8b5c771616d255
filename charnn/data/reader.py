"""A rank's ordered ``[B, T+1]`` step windows, read from its own shards with read-ahead."""
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
    """Windows of rows [rank*B, (rank+1)*B) of one split, step by step, from ``start_step``."""

    url: str
    manifest: Manifest
    split: str
    rank: int
    world: int
    store: Store = Store()

    def __post_init__(self):
        info = self.manifest.splits[self.split]
        if self.manifest.workers != self.world:
            raise DatasetError(f"{self.url} was laid out for {self.manifest.workers} workers, not {self.world}")
        self.rows = worker_rows(info.rows, self.world, self.rank)
        self.steps = info.steps
        self.seq_len = self.manifest.seq_len
        self.shards = [s for s in info.shards if s.worker == self.rank]

    def _load(self, shard: Shard) -> np.ndarray:
        fs, path = self.store.fs(self.manifest.shard_url(shard))
        with fs.open(path, "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        rows = table.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(self.rows.start, self.rows.stop)):
            raise DatasetError(f"{shard.path} holds rows {rows[:3]}..., not {self.rows}")
        tokens = table.column("tokens").combine_chunks()
        return tokens.values.to_numpy().reshape(len(rows), -1)

    def windows(self, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(step, uint8 array [B, T+1]) for every step from ``start_step`` to the split's end."""
        T = self.seq_len
        shards = [s for s in self.shards if s.steps[1] > start_step]
        with ThreadPoolExecutor(1, thread_name_prefix="charnn-read-ahead") as pool:
            pending = pool.submit(self._load, shards[0]) if shards else None
            for i, shard in enumerate(shards):
                block = pending.result()
                pending = pool.submit(self._load, shards[i + 1]) if i + 1 < len(shards) else None
                first = shard.steps[0]
                for step in range(max(first, start_step), shard.steps[1]):
                    offset = (step - first) * T
                    yield step, block[:, offset : offset + T + 1]
