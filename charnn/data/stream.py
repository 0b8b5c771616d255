"""A split's token stream as pieces of cache blobs, and range reads of it.

The stream is the split's documents' codes back to back, in URL order.  Piece i is
``length[i]`` codes at ``offset[i]`` of blob ``blob[i]`` and starts at stream offset
``starts[i]``.  Reading a range finds its pieces by binary search and reads each run of
pieces that lie close together in one blob with one range read, so a shard of many small
documents costs a few large reads, not one per document.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from charnn.errors import UserError
from charnn.storage import Store

MAX_GAP = 1 << 20  # bytes of other documents a range read may skip over instead of splitting


class StreamError(UserError):
    """Cached codes that do not match what the dataset's metadata says about them."""


@dataclass(frozen=True)
class Stream:
    blobs: tuple[str, ...]  # blob URLs
    blob: np.ndarray  # int32 per piece: index into blobs
    offset: np.ndarray  # int64 per piece: where it starts in its blob
    starts: np.ndarray  # int64, one more than pieces: where each piece starts in the stream

    @classmethod
    def of(cls, blobs, blob, offset, length) -> "Stream":
        length = np.asarray(length, np.int64)
        keep = length > 0
        starts = np.concatenate([[0], np.cumsum(length[keep])]).astype(np.int64)
        return cls(tuple(blobs), np.asarray(blob, np.int32)[keep], np.asarray(offset, np.int64)[keep], starts)

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])


@dataclass(frozen=True)
class RangeRead:
    """One read of ``blob`` bytes [lo, hi), of which the spans [keep_lo[i], keep_hi[i]) (relative
    to lo) are wanted, in order."""

    blob: int
    lo: int
    hi: int
    keep_lo: np.ndarray
    keep_hi: np.ndarray

    def wanted(self, data: np.ndarray) -> np.ndarray:
        if len(self.keep_lo) == 1 or np.array_equal(self.keep_lo[1:], self.keep_hi[:-1]):
            return data[self.keep_lo[0] : self.keep_hi[-1]]
        edges = np.zeros(len(data) + 1, np.int32)  # +1 where a span starts, -1 where it ends
        np.add.at(edges, self.keep_lo, 1)
        np.add.at(edges, self.keep_hi, -1)
        return data[np.cumsum(edges[:-1]) > 0]


def plan_reads(stream: Stream, begin: int, end: int, max_gap: int = MAX_GAP) -> list[RangeRead]:
    """The range reads that give stream tokens [begin, end), in order: pieces that follow each
    other in one blob, at most ``max_gap`` bytes apart, share a read."""
    if not 0 <= begin <= end <= stream.tokens:
        raise StreamError(f"tokens [{begin}, {end}) lie outside a stream of {stream.tokens}")
    pieces = np.arange(np.searchsorted(stream.starts, begin, side="right") - 1,
                       np.searchsorted(stream.starts, end, side="left"))
    piece_starts, piece_ends = stream.starts[pieces], stream.starts[pieces + 1]
    lo = stream.offset[pieces] + np.maximum(begin - piece_starts, 0)
    hi = stream.offset[pieces] + np.minimum(end, piece_ends) - piece_starts
    blob = stream.blob[pieces]
    lo, hi, blob = lo[hi > lo], hi[hi > lo], blob[hi > lo]
    if not len(lo):
        return []
    joins = (blob[1:] == blob[:-1]) & (lo[1:] >= hi[:-1]) & (lo[1:] <= hi[:-1] + max_gap)
    bounds = [0, *(np.flatnonzero(~joins) + 1).tolist(), len(lo)]
    return [RangeRead(int(blob[a]), int(lo[a]), int(hi[b - 1]), lo[a:b] - lo[a], hi[a:b] - lo[a])
            for a, b in zip(bounds, bounds[1:])]


class BlobReader:
    """Range reads of blobs: memory-mapped when local, ranged GETs otherwise."""

    def __init__(self, stream: Stream, store: Store):
        self.stream, self.store, self.maps = stream, store, {}

    def read(self, begin: int, end: int) -> np.ndarray:
        return self.read_into(np.empty(end - begin, np.uint8), begin)

    def read_into(self, out: np.ndarray, begin: int) -> np.ndarray:
        """Stream tokens [begin, begin + len(out)) copied into ``out`` (one copy from the cache)."""
        filled = 0
        for read in plan_reads(self.stream, begin, begin + len(out)):
            part = read.wanted(self._bytes(read.blob, read.lo, read.hi))
            out[filled : filled + len(part)] = part
            filled += len(part)
        if filled != len(out):
            raise StreamError(f"the document cache holds fewer codes than its index says ({filled} < "
                              f"{len(out)}); delete the dataset root's documents/ directory and rebuild")
        return out

    def _bytes(self, blob: int, lo: int, hi: int) -> np.ndarray:
        if blob not in self.maps:  # None: a remote blob
            path = self.store.local_path(self.stream.blobs[blob])
            self.maps[blob] = None if path is None else _memory_map(path)
        if self.maps[blob] is None:
            return np.frombuffer(self.store.read(self.stream.blobs[blob], lo, hi), np.uint8)
        return self.maps[blob][lo:hi]


def _memory_map(path: str) -> np.ndarray:
    return np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8)  # mmap refuses 0 bytes
