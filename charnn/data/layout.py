"""Row layout: the seed's minibatch sequencer, made distributed (pure arithmetic).

A split's token stream of N tokens is laid out as R rows of L = ((N-1) // (R*T)) * T
inputs.  Row r holds ``stream[r*L : r*L + L + 1]`` (L inputs plus one look-ahead
target), so it continues exactly where row r-1 ended, and step s of every row is the
window ``[s*T, s*T + T + 1)`` of that row.  Worker w of W owns a contiguous run of the R
rows, R // W of them or one more (the first R % W workers), so that any W up to R can
train the same rows.  A shard holds, for one worker of the W the dataset was laid out
for, a run of consecutive steps of all its rows: a reader of that many workers streams
its own shards in order; one of another group (elastic training) reads its rows from
whichever shards hold them.
"""
from __future__ import annotations

from dataclasses import dataclass

from charnn.errors import UserError


class LayoutError(UserError):
    """The corpus or the batch shape cannot be laid out."""


@dataclass(frozen=True)
class Layout:
    rows: int  # R
    seq_len: int  # T
    row_length: int  # L, inputs per row (a multiple of T)

    @property
    def steps(self) -> int:
        return self.row_length // self.seq_len

    def row_span(self, row: int) -> tuple[int, int]:
        """Stream offsets [begin, end) of a row, look-ahead included."""
        begin = row * self.row_length
        return begin, begin + self.row_length + 1

    def tokens_used(self) -> int:
        return self.rows * self.row_length + 1


def plan_rows(num_tokens: int, rows: int, seq_len: int) -> Layout:
    if rows <= 0 or seq_len <= 0:
        raise LayoutError(f"rows and seq_len must be > 0, got rows={rows} seq_len={seq_len}")
    row_length = ((num_tokens - 1) // (rows * seq_len)) * seq_len if num_tokens > 0 else 0
    if row_length < seq_len:
        raise LayoutError(
            f"corpus of {num_tokens} tokens is too small for one step of {rows} rows x "
            f"{seq_len} steps (needs {rows * seq_len + 1}); add text or lower "
            f"train.batch_per_worker / data.seq_len"
        )
    return Layout(rows, seq_len, row_length)


def worker_rows(rows: int, world: int, rank: int) -> range:
    """The global rows that worker ``rank`` of ``world`` owns: as even a split as there is (the
    first ``rows % world`` workers hold one row more), each worker's rows contiguous and in rank order."""
    if not 0 < world <= rows:
        raise LayoutError(f"{rows} rows cannot be split over {world} workers; each worker needs a row: "
                          f"lower cluster.num_workers or raise train.batch_per_worker")
    if not 0 <= rank < world:
        raise LayoutError(f"rank {rank} outside 0..{world - 1}")
    per_worker, extra = divmod(rows, world)
    start = rank * per_worker + min(rank, extra)
    return range(start, start + per_worker + (rank < extra))


def loss_weight(rows: int, world: int, rank: int) -> float:
    """What a rank's mean loss is multiplied by so that the mean over ranks (what DDP's gradient
    averaging computes) is the mean over all rows' tokens: 1 when ``world`` divides ``rows``."""
    return len(worker_rows(rows, world, rank)) * world / rows


def validation_rows(num_tokens: int, max_rows: int, seq_len: int, world: int) -> int:
    """Most rows (a multiple of ``world``, at most ``max_rows``) that give the split one step."""
    rows = (min(max_rows, (num_tokens - 1) // seq_len) // world) * world
    if rows <= 0:
        raise LayoutError(
            f"validation split of {num_tokens} tokens is too small for one step of {world} rows "
            f"x {seq_len}; add documents or raise data.val_fraction"
        )
    return rows


@dataclass(frozen=True)
class ShardPlan:
    worker: int
    rows: range  # global rows held
    steps: range  # steps held: tokens [steps.start*T, steps.stop*T + 1) of each row

    def name(self, split: str) -> str:
        return f"{split}-w{self.worker:04d}-s{self.steps.start:08d}.arrow"


def plan_shards(layout: Layout, world: int, shard_tokens: int) -> list[ShardPlan]:
    """Shards of at most about ``shard_tokens`` tokens, each one worker's step range."""
    plans = []
    for worker in range(world):
        rows = worker_rows(layout.rows, world, worker)
        steps_per_shard = max(1, shard_tokens // (len(rows) * layout.seq_len))
        for first in range(0, layout.steps, steps_per_shard):
            plans.append(ShardPlan(worker, rows, range(first, min(first + steps_per_shard, layout.steps))))
    return plans
