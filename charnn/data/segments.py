"""How a dataset grows (pure): which segments a new version keeps, which documents the new
segment lays out, and a version's splits as its segments' splits back to back.

The segment rule: a version keeps, in order, every segment of the previous version whose
documents are all still listed, unchanged and in the same split; every other listed document is
*free*, and the free documents, in URL order, are the new segment.  A split of the new segment
is laid out over the dataset's rows of that split (R for training; V, fixed by the first version,
for validation) only if its stream fills one step of them; otherwise its documents *wait*, not
laid out, until a later build adds enough text.  So a document added is laid out once, a segment
is never rewritten, and a removed or changed document moves only the other documents of its own
segment into the new one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from charnn.data.dataset import SEGMENTS, SegmentRecord, SegmentRef, Shard, Split


@dataclass(frozen=True)
class Growth:
    """What a build adds to the newest version: the segments it keeps, and the free documents."""

    kept: tuple[SegmentRef, ...]
    dropped: tuple[SegmentRef, ...]  # segments a removed or changed document leaves
    free: np.ndarray  # bool per listed document: not in a kept segment


def document_keys(table: pa.Table) -> pa.Array:
    """One string per document that is equal only for the same URL, content and split."""
    return pc.binary_join_element_wise(table.column("url_key"), table.column("identity"), table.column("split"),
                                       "\0").combine_chunks()


def plan_growth(listed: pa.Table, segments: tuple[SegmentRef, ...], previous: pa.Table | None) -> Growth:
    """``listed``: the documents now (``url_key``, ``identity``, ``split``), in URL order;
    ``previous``: the newest version's sources, in stream order, which hold ``segments`` one after
    the other (``SegmentRef.documents`` each)."""
    if previous is None or not segments:
        return Growth((), (), np.ones(listed.num_rows, bool))
    now = document_keys(listed)
    before = document_keys(previous)
    present = pc.is_in(before, value_set=now).to_numpy(zero_copy_only=False)
    bounds = np.cumsum([0, *(s.documents for s in segments)])
    whole = [bool(present[a:b].all()) for a, b in zip(bounds, bounds[1:])]
    kept = tuple(s for s, w in zip(segments, whole) if w)
    held = np.concatenate([np.arange(a, b) for (a, b), w in zip(zip(bounds, bounds[1:]), whole) if w] or [[]])
    free = ~pc.is_in(now, value_set=before.take(pa.array(held, pa.int64()))).to_numpy(zero_copy_only=False)
    return Growth(kept, tuple(s for s, w in zip(segments, whole) if not w), free)


def flatten(records: list[SegmentRecord], rows: dict[str, int], seq_len: int) -> dict[str, Split]:
    """A version's splits: row r is row r of every segment in turn, so each segment's shards come
    with their steps shifted by the steps of the segments before it."""
    splits = {}
    for name, count in rows.items():
        shards, first = [], 0
        for record in records:
            split = record.splits[name]
            shards += [Shard(f"{SEGMENTS}/{record.id}/{h.path}", h.worker, h.rows,
                             (h.steps[0] + first, h.steps[1] + first)) for h in split.shards]
            first += split.steps
        splits[name] = Split(count, first * seq_len, first, sum(r.splits[name].tokens for r in records), tuple(shards))
    return splits
