"""A growing dataset (``charnn.rows/3``): the segment rule, pure (``plan_growth``, ``flatten``), then
real builds on a local Ray whose every window is checked against rows rebuilt from the source
files, and a rebuild killed at several points that leaves the older version whole."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from support.env import LOOPBACK_ENV, REPO
from support.jobs import WORDS, write_corpus
from charnn.data import build as build_module
from charnn.data.alphabet import encode
from charnn.data.build import DatasetRequest, build_dataset, dataset_directory
from charnn.data.dataset import (FORMAT, SEGMENT, SEGMENT_SHARD, SEGMENTS, SOURCES, Manifest, SegmentRecord,
                                 SegmentRef, Shard, Split, load_manifest, version_url)
from charnn.data.operators import StageOptions
from charnn.data.reader import SplitReader
from charnn.data.segments import flatten, plan_growth
from charnn.data.sources import split_hash
from charnn.storage import url_key

SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------
# Pure: which segments a build keeps, and a version's splits as its segments' back to back
# ---------------------------------------------------------------------------------------------

def sources_table(documents: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(documents, pa.schema([("url_key", pa.string()), ("identity", pa.string()),
                                                      ("split", pa.string())]))


@st.composite
def growths(draw):
    """The newest version (segments of documents, in stream order) and the documents listed now:
    each earlier document kept, removed, rewritten or moved to another split, and new ones added."""
    universe = draw(st.lists(st.integers(0, 10**6), min_size=0, max_size=40, unique=True))
    keys = [hashlib.sha256(str(u).encode()).hexdigest() for u in universe]
    n_before = draw(st.integers(0, len(keys)))
    before_keys, new_keys = keys[:n_before], keys[n_before:]
    sizes, left = [], n_before
    while left:
        sizes.append(draw(st.integers(1, left)))
        left -= sizes[-1]
    segments, previous, start = [], [], 0
    for k, size in enumerate(sizes):
        documents = sorted(({"url_key": key, "identity": f"sha256:{draw(st.integers(0, 2**32)):x}",
                             "split": draw(st.sampled_from(["train", "val", "both"]))}
                            for key in before_keys[start:start + size]), key=lambda d: d["url_key"])
        previous += documents
        segments.append(SegmentRef(f"{k:04x}{draw(st.integers(0, 2**48 - 1)):012x}", size,
                                   draw(st.integers(0, 9)), draw(st.integers(0, 9)), f"content{k}"))
        start += size
    fates = draw(st.lists(st.sampled_from(["keep", "remove", "rewrite", "resplit"]), min_size=n_before,
                          max_size=n_before))
    listed = []
    for document, fate in zip(previous, fates):
        if fate == "keep":
            listed.append(dict(document))
        elif fate == "rewrite":
            listed.append({**document, "identity": document["identity"] + "0"})
        elif fate == "resplit":
            listed.append({**document, "split": {"train": "val", "val": "both", "both": "train"}[document["split"]]})
    for key in new_keys:
        listed.append({"url_key": key, "identity": f"sha256:{draw(st.integers(0, 2**32)):x}",
                       "split": draw(st.sampled_from(["train", "val", "both"]))})
    listed.sort(key=lambda d: d["url_key"])  # URL order
    return listed, tuple(segments), previous, fates


@given(growths())
@settings(max_examples=200, deadline=None)
def test_a_build_keeps_exactly_the_segments_whose_documents_are_all_listed_unchanged(case):
    listed, segments, previous, fates = case
    growth = plan_growth(sources_table(listed), segments, sources_table(previous) if segments else None)
    # what each segment's documents became, counted from the segments' sizes
    bounds = np.cumsum([0, *(s.documents for s in segments)])
    whole = [all(f == "keep" for f in fates[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert growth.kept == tuple(s for s, w in zip(segments, whole) if w)
    assert growth.dropped == tuple(s for s, w in zip(segments, whole) if not w)
    held = {(d["url_key"], d["identity"], d["split"])
            for (a, b), w in zip(zip(bounds, bounds[1:]), whole) if w for d in previous[a:b]}
    assert growth.free.dtype == bool and growth.free.shape == (len(listed),)
    assert growth.free.tolist() == [(d["url_key"], d["identity"], d["split"]) not in held for d in listed]
    # every listed document is in a kept segment or free, never both
    assert int(growth.free.sum()) + sum(s.documents for s in growth.kept) == len(listed)


@given(st.lists(st.sampled_from(["train", "val", "both"]), max_size=12))
def test_the_first_build_lays_out_every_listed_document(splits):
    listed = sources_table([{"url_key": f"{i:064x}", "identity": f"sha256:{i}", "split": s}
                            for i, s in enumerate(splits)])
    growth = plan_growth(listed, (), None)
    assert growth.kept == () and growth.dropped == ()
    assert growth.free.dtype == bool and growth.free.tolist() == [True] * len(splits)


def test_a_resplit_document_drops_its_segment_even_with_its_content_unchanged():
    before = [{"url_key": "a", "identity": "sha256:1", "split": "train"},
              {"url_key": "b", "identity": "sha256:2", "split": "train"},
              {"url_key": "c", "identity": "sha256:3", "split": "val"}]
    segments = (SegmentRef("0" * 16, 2, 3, 0, "c0"), SegmentRef("1" * 16, 1, 0, 1, "c1"))
    now = [dict(before[0]), {**before[1], "split": "val"}, dict(before[2]), {"url_key": "d", "identity": "sha256:4",
                                                                             "split": "train"}]
    growth = plan_growth(sources_table(now), segments, sources_table(before))
    assert growth.kept == segments[1:] and growth.dropped == segments[:1]
    assert growth.free.tolist() == [True, True, False, True]


@st.composite
def segment_records(draw):
    """Segment records as builds write them: per split, each worker's shards cover the segment's
    steps in runs; a split a segment does not lay out has no steps."""
    world = draw(st.integers(1, 3))
    rows = {"train": world * draw(st.integers(1, 3)), "val": world * draw(st.integers(1, 3))}
    seq_len = draw(st.integers(1, 8))
    records = []
    for k in range(draw(st.integers(0, 4))):
        splits = {}
        for name, count in rows.items():
            steps = draw(st.integers(0, 7))
            if not steps:
                splits[name] = Split(0, 0, 0, 0, ())
                continue
            run = draw(st.integers(1, steps))
            per = count // world
            shards = tuple(Shard(f"{name}-w{w:04d}-s{first:08d}.arrow", w, (w * per, (w + 1) * per),
                                 (first, min(first + run, steps)))
                           for w in range(world) for first in range(0, steps, run))
            tokens = draw(st.integers(count * steps * seq_len + 1, (count * (steps + 1)) * seq_len))
            splits[name] = Split(count, steps * seq_len, steps, tokens, shards)
        records.append(SegmentRecord(f"{k:04x}{draw(st.integers(0, 2**48 - 1)):012x}", draw(st.integers(1, 9)),
                                     splits, f"content{k}"))
    return records, rows, seq_len, world


@given(segment_records())
@settings(max_examples=200, deadline=None)
def test_a_versions_split_is_its_segments_splits_back_to_back(case):
    records, rows, seq_len, world = case
    splits = flatten(records, rows, seq_len)
    assert set(splits) == set(rows)
    for name, count in rows.items():
        split = splits[name]
        # which (segment, segment step) each of the version's steps is
        owner = [(k, s) for k, record in enumerate(records) for s in range(record.splits[name].steps)]
        assert (split.rows, split.steps, split.row_length) == (count, len(owner), len(owner) * seq_len)
        assert split.tokens == sum(record.splits[name].tokens for record in records)
        expected = []
        for k, record in enumerate(records):
            for shard in record.splits[name].shards:
                first = owner.index((k, shard.steps[0]))
                expected.append(Shard(f"segments/{record.id}/{shard.path}", shard.worker, shard.rows,
                                      (first, first + shard.steps[1] - shard.steps[0])))
        assert split.shards == tuple(expected)
        for shard in split.shards:
            assert SEGMENT_SHARD.fullmatch(shard.path)
            k, s = owner[shard.steps[0]]
            assert shard.path.startswith(f"segments/{records[k].id}/") and shard.path.endswith(f"-s{s:08d}.arrow")
        for worker in range(world):  # a rank's shards, in order, are every step once
            mine = [shard for shard in split.shards if shard.worker == worker]
            assert [step for shard in mine for step in range(*shard.steps)] == list(range(len(owner)))
    # a manifest of these splits survives its own JSON (whose reader checks the shard paths)
    manifest = Manifest("gorner98", 98, seq_len, world, "rule", 0.1, sum(r.documents for r in records), splits,
                        "digest", segments=tuple(r.ref() for r in records), version=3)
    assert Manifest.from_json("x/versions/v000003", manifest.to_json()) == manifest


# ---------------------------------------------------------------------------------------------
# On a real local Ray: rows rebuilt from scratch, from the source files
# ---------------------------------------------------------------------------------------------

def request(tmp_path, corpus, **overrides) -> DatasetRequest:
    fields = dict(sources=[str(corpus)], alphabet="gorner98", seq_len=8, rows=4, workers=2, val_fraction=0.25,
                  shard_mb=1, dataset_root=str(tmp_path / "datasets"),
                  stage=StageOptions(in_process_bytes=0))  # Ray Data's tasks, however small
    return DatasetRequest(**{**fields, **overrides})


def prose(seed: int, lines: int) -> bytes:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + ".\n"
                   for _ in range(lines)).encode()


class Corpus:
    """A corpus directory, and every text any of its files has held, by identity (so that rows laid
    out from a document since rewritten can still be rebuilt)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.texts: dict[str, bytes] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def remember(self, path: Path) -> Path:
        data = path.read_bytes()
        self.texts["sha256:" + hashlib.sha256(data).hexdigest()] = data
        return path

    def write(self, name: str, data: bytes) -> Path:
        (self.directory / name).write_bytes(data)
        return self.remember(self.directory / name)

    def generate(self, documents: int, lines: int, seed: int, prefix: str) -> list[Path]:
        return [self.remember(p) for p in write_corpus(self.directory, documents, lines, seed, prefix)]

    def name_in(self, split: str, prefix: str, val_fraction: float = 0.25) -> str:
        """A new file name that the split rule puts in ``split`` (its key is its name)."""
        for i in range(10_000):
            name = f"{prefix}-{i:03d}.txt"
            if not (self.directory / name).exists() and (split_hash(name) < val_fraction) == (split == "val"):
                return name
        raise AssertionError("no such name")


def snapshot(directory) -> dict[str, tuple]:
    """Every file under ``directory``: its content hash, mtime and inode (a rewrite shows in one of them)."""
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            st_ = path.stat()
            files[str(path.relative_to(directory))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                       st_.st_mtime_ns, st_.st_ino)
    return files


def under(files: dict, prefix: str) -> dict:
    return {k: v for k, v in files.items() if k.startswith(prefix)}


def segment_documents(directory: str, ref: SegmentRef) -> list[dict]:
    """A segment's sources table, read directly (not through the Manifest)."""
    return pq.read_table(Path(directory) / "segments" / ref.id / "sources.parquet").to_pylist()


def segment_rows(corpus: Corpus, documents: list[dict], rows: dict[str, int], seq_len: int,
                 val_fraction: float, tokens: dict[str, int] | None = None) -> dict[str, list[np.ndarray]]:
    """Per split, a segment's rows rebuilt from scratch: its documents' texts encoded, in URL order,
    train/val as its sources table says, laid out over R (V) rows of L = ((N-1) // (R*T)) * T;
    each split's stream length is added to ``tokens``."""
    assert [d["url"] for d in documents] == sorted(d["url"] for d in documents), "not in URL order"
    laid_out = {}
    for split, count in rows.items():
        pieces = []
        for d in documents:
            codes = encode(corpus.texts[d["identity"]])  # a KeyError: the identity is not its content's
            assert d["tokens"] == codes.size and d["url_key"] == url_key(d["url"])
            if d["split"] == split:
                pieces.append(codes)
            elif d["split"] == "both":
                cut = codes.size - int(codes.size * val_fraction)
                pieces.append(codes[:cut] if split == "train" else codes[cut:])
        stream = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        if tokens is not None:
            tokens[split] += stream.size
        if not stream.size:
            laid_out[split] = []
            continue
        length = ((stream.size - 1) // (count * seq_len)) * seq_len
        assert length >= seq_len, f"the segment holds {split} documents that do not fill a step"
        laid_out[split] = [stream[r * length: r * length + length + 1] for r in range(count)]
    return laid_out


def windows_of(rows: list[np.ndarray], count: int, seq_len: int) -> np.ndarray:
    """[steps, R, T+1]: step s of every row is [s*T, s*T + T + 1) of it."""
    steps = (len(rows[0]) - 1) // seq_len if rows else 0
    return np.array([[row[s * seq_len: s * seq_len + seq_len + 1] for row in rows] for s in range(steps)],
                    np.uint8).reshape(steps, count, seq_len + 1)


def read_windows(url: str, manifest: Manifest, split: str) -> np.ndarray:
    """[steps, R, T+1]: what every rank's SplitReader reads, its rows put side by side."""
    world, info = manifest.workers, manifest.splits[split]
    per_rank = []
    for rank in range(world):
        got = list(SplitReader(url, manifest, split, rank, world).windows())
        assert [s for s, _ in got] == list(range(info.steps))
        per_rank.append(np.array([w for _, w in got], np.uint8).reshape(info.steps, info.rows // world,
                                                                        manifest.seq_len + 1))
    return np.concatenate(per_rank, axis=1)


def rows_by_segment(windows: np.ndarray, steps: list[int]) -> list[np.ndarray]:
    """[R, L_k + 1] per segment: each segment's windows joined, the look-ahead dropped but the last."""
    rows, first = [], 0
    for count in steps:
        if count:
            block = windows[first:first + count]
            rows.append(np.concatenate([np.concatenate(list(block[:, :, :-1]), axis=1), block[-1][:, -1:]], axis=1))
        else:
            rows.append(np.zeros((windows.shape[1], 0), np.uint8))
        first += count
    return rows


def verify_version(url: str, corpus: Corpus) -> tuple[Manifest, dict[str, np.ndarray]]:
    """Every window of every rank of both splits is the one rebuilt from the source files, segment
    by segment; returns the manifest and the windows read."""
    manifest = load_manifest(url)
    assert manifest.format == FORMAT and manifest.url == url == version_url(manifest.directory, manifest.version)
    rows = {split: manifest.splits[split].rows for split in SPLITS}
    expected = {split: [] for split in SPLITS}
    tokens = dict.fromkeys(SPLITS, 0)
    documents = []
    for ref in manifest.segments:
        record = json.loads((Path(manifest.directory) / "segments" / ref.id / "segment.json").read_text())
        assert (record["id"], record["documents"], record["content"]) == (ref.id, ref.documents, ref.content)
        docs = segment_documents(manifest.directory, ref)
        assert len(docs) == ref.documents
        documents += docs
        laid = segment_rows(corpus, docs, rows, manifest.seq_len, manifest.val_fraction, tokens)
        for split in SPLITS:
            windows = windows_of(laid[split], rows[split], manifest.seq_len)
            assert len(windows) == getattr(ref, f"{split}_steps") == record["splits"][split]["steps"]
            expected[split].append(windows)
    read = {}
    for split in SPLITS:
        info = manifest.splits[split]
        want = np.concatenate(expected[split]) if expected[split] else np.zeros((0, rows[split], manifest.seq_len + 1))
        assert (info.steps, info.row_length, info.tokens) == (len(want), len(want) * manifest.seq_len, tokens[split])
        read[split] = read_windows(url, manifest, split)
        assert read[split].shape == want.shape and np.array_equal(read[split], want), f"{split} windows differ"
    assert manifest.documents == len(documents)
    assert manifest.sources().to_pylist() == documents  # the version's sources: its segments', in order
    return manifest, read


def steps_of(manifest: Manifest, split: str) -> list[int]:
    return [getattr(ref, f"{split}_steps") for ref in manifest.segments]


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 16 steps, so that a segment has several per worker (shard_mb is whole megabytes)."""
    real = build_module.plan_shards
    monkeypatch.setattr(build_module, "plan_shards",
                        lambda layout, world, tokens: real(layout, world, 16 * layout.rows // world * layout.seq_len))


def assert_rows_continue(corpus, docs, older, grown) -> None:
    """Row r of the grown version is row r of the older one, then row r of the new segment, which
    is rebuilt here from the added files (``docs``); each is (manifest, windows by split)."""
    (v1, v1_windows), (v2, v2_windows) = older, grown
    laid = segment_rows(corpus, docs, {s: v1.splits[s].rows for s in SPLITS}, v1.seq_len, v1.val_fraction)
    for split in SPLITS:
        old_rows, new_rows = rows_by_segment(v2_windows[split], steps_of(v2, split))
        (v1_rows,) = rows_by_segment(v1_windows[split], steps_of(v1, split))
        assert np.array_equal(old_rows, v1_rows)
        assert np.array_equal(new_rows, np.array(laid[split]).reshape(new_rows.shape))
        assert new_rows.shape[1] > 0
        assert np.array_equal(v2_windows[split][:v1.splits[split].steps], v1_windows[split])


@pytest.mark.ray
def test_a_grown_corpus_adds_one_segment_and_leaves_the_older_version_untouched(ray_local, tmp_path, small_shards):
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(8, 40, seed=1, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    directory = dataset_directory(wanted)
    first = build_dataset(wanted).url
    assert first == version_url(directory, 1)
    v1, v1_windows = verify_version(first, corpus)
    assert len(v1.segments) == 1 and v1.waiting == 0
    assert any(len(s.shards) > 2 * 2 for s in v1.splits.values())  # several shards a worker: steps shifted
    before = snapshot(directory)

    # a reader of v1, part-way through, while v2 is written
    reading = SplitReader(first, v1, "train", 1, 2).windows()
    head = [next(reading) for _ in range(3)]

    added = [corpus.write(corpus.name_in(split, f"added-{split}"), prose(seed, 30))
             for seed, split in enumerate(["train", "val", "train"])]
    second = build_dataset(wanted).url
    assert second == version_url(directory, 2) and load_manifest(directory).url == second
    v2, v2_windows = verify_version(second, corpus)
    after = snapshot(directory)

    # v1's segment and version: byte-identical, not rewritten; v2 adds one segment and its version
    assert under(after, "segments/" + v1.segments[0].id + "/") == under(before, "segments/" + v1.segments[0].id + "/")
    assert {k: v for k, v in after.items() if k in before} == before
    assert v2.segments[:1] == v1.segments and len(v2.segments) == 2 and v2.waiting == 0
    new = v2.segments[1]
    assert {k.split("/")[1] if k.startswith("segments/") else k for k in set(after) - set(before)} == {
        new.id, "versions/v000002/manifest.json"}

    # the new segment: exactly the added documents, in URL order
    docs = segment_documents(directory, new)
    assert [d["url"] for d in docs] == sorted(str(p) for p in added)
    assert {d["split"] for d in docs} == {"train", "val"}
    assert SEGMENT_SHARD.fullmatch(f"segments/{new.id}/x.arrow") and new.id != v1.segments[0].id

    assert_rows_continue(corpus, docs, (v1, v1_windows), (v2, v2_windows))

    # the reader opened on v1 reads on as if nothing happened, and v1 reads whole again
    rest = head + list(reading)
    assert [s for s, _ in rest] == list(range(v1.splits["train"].steps))
    assert np.array_equal(np.array([w for _, w in rest]), v1_windows["train"][:, 2:4])
    verify_version(first, corpus)

    assert_nothing_new_writes_nothing(wanted, second, v2)

    # what a run resumes on: another version is another stream
    assert v1.stream and v2.stream and v1.stream != v2.stream


@pytest.mark.ray
def test_a_small_addition_waits_until_its_split_fills_a_step(ray_local, tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(6, 30, seed=2, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    directory = dataset_directory(wanted)
    first = build_dataset(wanted).url
    v1, _ = verify_version(first, corpus)
    one_step = wanted.rows * wanted.seq_len + 1

    # fewer tokens than one step of R rows: no new version (or one whose documents wait)
    tiny = corpus.write(corpus.name_in("train", "tiny"), b"Tiny.\nText.\n")
    assert encode(tiny.read_bytes()).size < one_step
    before = snapshot(directory)
    url = build_dataset(wanted).url
    newest = load_manifest(url)
    if url == first:
        assert snapshot(directory) == before
    else:
        assert newest.waiting >= 1 and newest.segments == v1.segments
    assert str(tiny) not in [d["url"] for d in newest.sources().to_pylist()]

    # enough validation text: it is laid out, the train document still waits
    val = corpus.write(corpus.name_in("val", "more-val"), prose(7, 20))
    second = build_dataset(wanted).url
    v2, _ = verify_version(second, corpus)
    assert v2.waiting == 1 and v2.segments[:1] == v1.segments and len(v2.segments) == 2
    assert [d["url"] for d in segment_documents(directory, v2.segments[1])] == [str(val)]
    assert v2.segments[1].train_steps == 0 and v2.segments[1].val_steps > 0

    # enough train text: the waiting document is laid out with it, in URL order
    big = corpus.write(corpus.name_in("train", "more-train"), prose(8, 20))
    third = build_dataset(wanted).url
    v3, _ = verify_version(third, corpus)
    assert v3.waiting == 0 and v3.segments[:2] == v2.segments and len(v3.segments) == 3
    assert [d["url"] for d in segment_documents(directory, v3.segments[2])] == sorted([str(tiny), str(big)])
    assert len({v1.stream, v2.stream, v3.stream}) == 3


@pytest.mark.ray
def test_a_one_document_corpus_in_both_splits_grows_like_any_other(ray_local, tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    (only,) = corpus.generate(1, 60, seed=16, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    v1, v1_windows = verify_version(build_dataset(wanted).url, corpus)
    assert [d["split"] for d in v1.sources().to_pylist()] == ["both"]
    corpus.write(corpus.name_in("train", "later"), prose(17, 30))
    corpus.write(corpus.name_in("val", "later"), prose(18, 30))
    v2, v2_windows = verify_version(build_dataset(wanted).url, corpus)
    assert v2.segments[:1] == v1.segments and len(v2.segments) == 2
    assert [d["split"] for d in v2.sources().to_pylist()] == ["both", "train", "val"]  # it keeps its split
    assert all(np.array_equal(v2_windows[s][:v1.splits[s].steps], v1_windows[s]) for s in SPLITS)
    corpus.write(only.name, only.read_bytes() + prose(19, 10))  # rewritten: laid out again, still in both
    v3, _ = verify_version(build_dataset(wanted).url, corpus)
    assert v3.segments[:1] == v2.segments[1:] and len(v3.segments) == 2
    assert [d["split"] for d in segment_documents(v3.directory, v3.segments[1])] == ["both"]


@pytest.mark.ray
def test_a_removed_or_rewritten_document_moves_only_its_own_segment(ray_local, tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    original = corpus.generate(6, 30, seed=3, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    directory = dataset_directory(wanted)
    v1, _ = verify_version(build_dataset(wanted).url, corpus)
    added = corpus.generate(3, 30, seed=4, prefix="later")
    v2, v2_windows = verify_version(build_dataset(wanted).url, corpus)
    a, b = v2.segments
    before = snapshot(directory)

    # remove one of v1's documents: its segment goes, its other documents are the new segment
    a_docs = segment_documents(directory, a)
    gone = next(d["url"] for d in a_docs if d["split"] == "train")
    os.unlink(gone)
    v3, _ = verify_version(build_dataset(wanted).url, corpus)
    assert v3.version == 3 and v3.segments[0] == b and len(v3.segments) == 2
    c = v3.segments[1]
    c_docs = segment_documents(directory, c)
    assert [d["url"] for d in c_docs] == [d["url"] for d in a_docs if d["url"] != gone]
    assert [(d["identity"], d["split"]) for d in c_docs] == [(d["identity"], d["split"]) for d in a_docs
                                                              if d["url"] != gone]
    after = snapshot(directory)
    assert {k: v for k, v in after.items() if k in before} == before  # b, a and v1, v2: untouched
    _, again = verify_version(v2.url, corpus)  # the older versions still read whole
    assert all(np.array_equal(again[s], v2_windows[s]) for s in SPLITS)

    # rewrite one of the second build's documents: only that segment goes, and it keeps its split
    b_docs = segment_documents(directory, b)
    changed = Path(b_docs[1]["url"])
    corpus.write(changed.name, prose(99, 25))
    v4, _ = verify_version(build_dataset(wanted).url, corpus)
    assert v4.segments[0] == c and len(v4.segments) == 2
    d_docs = segment_documents(directory, v4.segments[1])
    assert [d["url"] for d in d_docs] == [d["url"] for d in b_docs]
    assert [d["split"] for d in d_docs] == [d["split"] for d in b_docs]
    assert [d["identity"] == e["identity"] for d, e in zip(d_docs, b_docs)] == [True, False, True]
    assert {k: v for k, v in snapshot(directory).items() if k in after} == after
    assert len({v1.stream, v2.stream, v3.stream, v4.stream}) == 4
    assert sorted(str(p) for p in original + added if p.exists()) == sorted(
        d["url"] for d in v4.sources().to_pylist())


@pytest.mark.ray
def test_a_segment_whose_documents_are_all_removed_leaves_and_comes_back_the_same(ray_local, tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(6, 30, seed=12, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    directory = dataset_directory(wanted)
    v1, v1_windows = verify_version(build_dataset(wanted).url, corpus)
    added = corpus.generate(2, 30, seed=13, prefix="later")
    v2, _ = verify_version(build_dataset(wanted).url, corpus)
    before = snapshot(directory)

    kept = {path: path.read_bytes() for path in added}
    for path in added:
        path.unlink()
    v3, v3_windows = verify_version(build_dataset(wanted).url, corpus)  # v2 less its second segment: v1 again
    assert v3.version == 3 and v3.segments == v1.segments and v3.waiting == 0
    assert all(np.array_equal(v3_windows[s], v1_windows[s]) for s in SPLITS)
    assert v3.stream == v1.stream  # the same stream: a run on v1 resumes on v3

    for path, data in kept.items():
        corpus.write(path.name, data)
    v4, _ = verify_version(build_dataset(wanted).url, corpus)  # the same documents again: the same segment, reused
    assert v4.version == 4 and v4.segments == v2.segments and v4.stream == v2.stream
    after = snapshot(directory)
    # its shards untouched; its record and sources table written again, with the same bytes (which
    # makes the reused segment young: gc leaves it alone while this build names it)
    again = {f"{SEGMENTS}/{v2.segments[1].id}/{name}" for name in (SEGMENT, SOURCES)}
    assert {k: v for k, v in after.items() if k in before and k not in again} == \
        {k: v for k, v in before.items() if k not in again}
    assert all(after[k][0] == before[k][0] for k in again)


@pytest.mark.ray
def test_a_removed_document_whose_segment_mates_cannot_fill_a_step_leaves_them_waiting(ray_local, tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(6, 30, seed=14, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    v1, _ = verify_version(build_dataset(wanted).url, corpus)
    big = corpus.write(corpus.name_in("train", "big"), prose(15, 30))
    tiny = corpus.write(corpus.name_in("train", "tiny"), b"Tiny.\n")
    v2, _ = verify_version(build_dataset(wanted).url, corpus)
    assert sorted(d["url"] for d in segment_documents(v2.directory, v2.segments[1])) == sorted([str(big), str(tiny)])

    big.unlink()
    v3, _ = verify_version(build_dataset(wanted).url, corpus)
    assert v3.segments == v1.segments and v3.waiting == 1


@pytest.mark.ray
def test_the_stream_digest_is_the_same_for_the_same_stream_on_another_worker_count_or_root(ray_local, tmp_path):
    """stream_digest: "not ... its number of workers, so that a run resumes on another W"; segment_id:
    "not W, nor where it is stored"."""
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(6, 30, seed=5, prefix="doc")
    two, _ = verify_version(build_dataset(request(tmp_path, corpus.directory, rows=4, workers=2)).url, corpus)
    one, _ = verify_version(build_dataset(request(tmp_path, corpus.directory, rows=4, workers=1)).url, corpus)
    elsewhere, _ = verify_version(build_dataset(request(tmp_path, corpus.directory,
                                                        dataset_root=str(tmp_path / "elsewhere"))).url, corpus)
    train = read_windows(two.url, two, "train")
    assert np.array_equal(read_windows(one.url, one, "train"), train)
    assert np.array_equal(read_windows(elsewhere.url, elsewhere, "train"), train)
    assert one.stream == two.stream == elsewhere.stream
    # another R is another stream
    four, _ = verify_version(build_dataset(request(tmp_path, corpus.directory, rows=2, workers=2)).url, corpus)
    assert four.stream != two.stream


@pytest.mark.ray
def test_the_stream_digest_is_the_same_for_the_same_stream_from_a_moved_corpus(ray_local, tmp_path):
    """stream_digest: "not its URLs ..., so that a run resumes ... on a moved corpus"."""
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(6, 30, seed=6, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    first, _ = verify_version(build_dataset(wanted).url, corpus)
    moved = Corpus(tmp_path / "moved")
    for path in sorted(corpus.directory.iterdir()):
        os.utime(moved.write(path.name, path.read_bytes()), ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    second, _ = verify_version(build_dataset(request(tmp_path, moved.directory)).url, moved)
    assert second.version == 2  # the same dataset directory: every document moved, so one new segment
    assert np.array_equal(read_windows(first.url, first, "train"), read_windows(second.url, second, "train"))
    assert first.stream == second.stream


# ---------------------------------------------------------------------------------------------
# A rebuild killed with SIGKILL
# ---------------------------------------------------------------------------------------------

# Runs charnn.cli.tokenize as ``python -m`` does, after replacing one of charnn.data.build's steps by
# a SIGKILL of the process itself: a kill at a known point of the build.
KILL_AT = """
import os, runpy, signal, sys
import charnn.data.build as build
setattr(build, sys.argv.pop(1), lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
runpy.run_module("charnn.cli.tokenize", run_name="__main__", alter_sys=True)
"""


def assert_nothing_new_writes_nothing(wanted, newest: str, manifest) -> None:
    """Nothing new: the same version, and not a byte written anywhere under the dataset root."""
    everything = snapshot(wanted.dataset_root)
    assert build_dataset(wanted).url == newest
    assert snapshot(wanted.dataset_root) == everything
    assert load_manifest(newest) == manifest and load_manifest(newest).stream == manifest.stream


def assert_rerun_completes(jobs, corpus, older, before: dict) -> str:
    """A plain rerun writes v2, whose first segment is v1's, untouched; v2's URL."""
    (v1, v1_windows) = older
    proc = jobs.start("-m", "charnn.cli.tokenize")
    proc.wait(timeout=180)
    out, err = proc.output()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    directory = v1.directory
    assert result["dataset"] == version_url(directory, 2)
    v2, v2_windows = verify_version(result["dataset"], corpus)
    assert v2.segments[:1] == v1.segments and len(v2.segments) == 2
    for split in SPLITS:
        assert np.array_equal(v2_windows[split][:v1.splits[split].steps], v1_windows[split])
    assert {k: v for k, v in snapshot(directory).items() if k in before} == before
    assert sorted(p.name for p in (Path(directory) / "versions").iterdir()) == ["v000001", "v000002"]
    return result["dataset"]


class Jobs:
    """Tokenize jobs in processes of their own, output in files (a pipe nobody reads while it runs
    could fill and stall it), all killed at the end."""

    def __init__(self, tmp_path, args: list[str], env: dict):
        self.tmp_path, self.args, self.env, self.started = tmp_path, args, env, []

    def start(self, *command: str) -> subprocess.Popen:
        log = self.tmp_path / f"job-{len(self.started)}"
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, *command, *self.args], cwd=REPO, env=self.env, stdout=out,
                                    stderr=err, start_new_session=True)
        proc.output = lambda: (Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()[-3000:])
        self.started.append(proc)
        return proc

    def kill_all(self) -> None:  # a job left running by a failed assertion must not write under the next test
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill_when(self, appeared) -> subprocess.Popen:
        """The real command, SIGKILLed from outside once ``appeared()`` is true."""
        proc = self.start("-m", "charnn.cli.tokenize")
        deadline = time.monotonic() + 120
        while not appeared():
            assert proc.poll() is None, f"the build ended before writing a shard: {proc.output()[1]}"
            assert time.monotonic() < deadline, "no shard file appeared"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        return proc


def assert_whole(first: str, v1, v1_windows, before: dict, where: str) -> None:
    """Version ``first`` (v1) is still the newest, reads whole, and not one of its bytes changed."""
    directory = first.rsplit("/versions/", 1)[0]
    assert load_manifest(directory).url == first, f"killed {where}: a version appeared"
    manifest = load_manifest(first)
    assert manifest == v1
    for split in SPLITS:
        assert np.array_equal(read_windows(first, manifest, split), v1_windows[split]), f"killed {where}"
    assert {k: v for k, v in snapshot(directory).items() if k in before} == before, f"killed {where}"


@pytest.mark.ray
@pytest.mark.faults
def test_a_rebuild_killed_at_any_point_leaves_the_older_version_whole_and_a_rerun_completes(ray_local, tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.generate(6, 30, seed=10, prefix="doc")
    wanted = request(tmp_path, corpus.directory)
    directory = dataset_directory(wanted)
    first = build_dataset(wanted).url
    v1, v1_windows = verify_version(first, corpus)
    before = snapshot(directory)
    corpus.generate(3, 40, seed=11, prefix="later")
    args = ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{corpus.directory}]",
            "--set", f"data.dataset_root={wanted.dataset_root}", "--set", "data.seq_len=8",
            "--set", "train.batch_per_worker=2", "--set", "cluster.num_workers=2",
            "--set", "data.val_fraction=0.25", "--set", "data.shard_mb=1", "--set", "data.in_process_mb=0"]
    # the job joins this module's Ray as a driver (a job's own Ray would take far longer to start)
    address = ray_local.get_runtime_context().gcs_address
    jobs = Jobs(tmp_path, args, {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": address})

    def new_segment_files() -> list[str]:
        return sorted(str(p) for p in (Path(directory) / "segments").rglob("*")
                      if p.is_file() and p.parent.name != v1.segments[0].id)

    try:
        killed = []
        for point in ("write_dataset", "shards", "write_segment", "write_version"):
            if point == "shards":  # killed from outside once a shard file of it appears
                seen = set(new_segment_files())
                proc = jobs.kill_when(lambda: set(new_segment_files()) - seen)
            else:
                proc = jobs.start("-c", KILL_AT, point)
            proc.wait(timeout=180)
            assert proc.returncode == -signal.SIGKILL, f"{point}: exited {proc.returncode}: {proc.output()[1]}"
            killed.append((point, [Path(p).name for p in new_segment_files()]))
            assert_whole(first, v1, v1_windows, before, f"at {point}")
        assert not killed[0][1], "killed before laying out, yet segment files exist"
        assert any(name == "segment.json" for name in killed[-1][1]), "the last kill came before the segment was whole"

        second = assert_rerun_completes(jobs, corpus, (v1, v1_windows), before)
        assert build_dataset(wanted).url == second
    finally:
        jobs.kill_all()
