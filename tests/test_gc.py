"""charnn-gc (charnn/retention.py, charnn/cli/gc.py): the retention rules on their own; then real
datasets (built on a real local Ray and grown to three versions) beside a model registry, candidates,
rejected records, user runs and another model's registry, on local files and on moto's S3: a dry run
changes nothing, --apply removes exactly what nothing needs and leaves everything kept readable, and
--apply killed (SIGKILL) at many points loses nothing kept and is finished by the next run."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from support.env import LOOPBACK_ENV, REPO
from support.jobs import last_json, write_corpus
from support.servers import free_port
from charnn import retention as rt
from charnn.checkpoint import load_model
from charnn.cli.gc import run as gc
from charnn.spec_loader import load_spec
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.dataset import MANIFEST, SEGMENT, SEGMENTS, SOURCES, load_manifest, load_segment
from charnn.data.reader import SplitReader
from charnn.errors import UserError
from charnn.lease import LeaseRecord, this_process
from charnn.model import CharGRU, ModelShape
from charnn.registry import DatasetInfo, ModelRegistry, RegistryBusy, VersionInfo
from charnn.storage import StorageError, Store, join

SMOKE = str(REPO / "jobs" / "specs" / "smoke.yaml")
CACHE = "documents/v2/gorner98"
# rounds, oldest first: [0] left only a rejected record, [2] is being trained (a live run lease)
ROUNDS = ("20251231-235959-0f0f0f", "20260101-000000-aaaaaa", "20260102-000000-bbbbbb", "20260103-000000-cccccc",
          "20260104-000000-dddddd")


# ---------------------------------------------------------------------------------------------
# The rules, without storage


def test_the_published_version_and_the_newest_others_are_kept():
    names = [f"v{n:04d}" for n in range(1, 7)]
    assert rt.kept_model_versions(names, "v0002", 3) == {"v0002", "v0006", "v0005"}
    assert rt.kept_model_versions(names, "v0006", 3) == {"v0006", "v0005", "v0004"}
    assert rt.kept_model_versions(names, None, 2) == {"v0006", "v0005"}
    assert rt.kept_model_versions(names, "v0001", 1) == {"v0001"}
    assert rt.kept_model_versions(["v0009", "v0010", "v0008"], None, 1) == {"v0010"}  # by number, not as text


def test_the_last_rounds_are_kept_and_names_of_other_forms_always():
    names = [ROUNDS[3], ROUNDS[1], ROUNDS[2], ROUNDS[2], "my-own-run"]
    assert rt.kept_rounds(names, 2) == {ROUNDS[3], ROUNDS[2], "my-own-run"}
    assert rt.kept_rounds(names, 9) == set(names)


def rows3(*versions, segments=()) -> rt.Rows3:
    """versions: (number, when its manifest was written or None, its newest file's time or None)."""
    return rt.Rows3("d", tuple(rt.DatasetVersion(n, rt.Item(f"d/versions/v{n:06d}", 1, newest), written)
                               for n, written, newest in versions),
                    tuple(rt.Segment(s, rt.Item(f"d/segments/{s}", 1, newest), True) for s, newest in segments))


def test_dataset_versions_stay_when_newest_claimed_possibly_in_use_or_young_and_unfinished():
    now = 10_000.0
    dataset = rows3((1, 100.0, 100.0), (2, 200.0, 200.0), (3, 300.0, 300.0), (4, 400.0, 400.0),
                    (5, None, 9_900.0), (6, None, 500.0), (7, None, None))

    def kept(claimed=(), since=(), min_age=1_000.0):
        return rt.kept_dataset_versions(dataset, frozenset(claimed), since, min_age, now)

    assert kept() == {4, 5}  # the newest complete one; an unfinished one written 100 s ago
    assert kept(min_age=0) == {4}
    assert kept(claimed={"d/versions/v000001", "d/versions/v000007"}) == {1, 4, 5, 7}
    assert kept(since=(250.0,)) == {2, 3, 4, 5}  # a holder since 250 may hold v2, the newest then
    assert kept(min_age=9_750.0) == {2, 3, 4, 5, 6}  # a build that started 9750 s ago may grow from v2
    assert kept(since=(-math.inf,)) == {1, 2, 3, 4, 5}  # a holder since when is unknown: every version
    assert rt.kept_dataset_versions(rows3((1, None, 100.0)), frozenset(), (), 0.0, now) == set()


def test_segments_stay_while_a_kept_version_names_them_or_they_are_young():
    a, b, c = "a" * 16, "b" * 16, "c" * 16
    dataset = rows3((1, 100.0, 100.0), segments=((a, 100.0), (b, 9_990.0), (c, 100.0)))
    assert rt.kept_segments(dataset, frozenset({a}), 1_000.0, 10_000.0) == {a, b}
    assert rt.kept_segments(dataset, None, 1_000.0, 10_000.0) == {a, b, c}  # a manifest unreadable: all stay


def test_a_lease_is_live_until_released_expired_or_its_process_ended():
    now = time.time()
    record = LeaseRecord("x", now + 60, released=False, acquired=now - 5, process=this_process())
    assert rt.lease_is_live(record, now, now)
    assert not rt.lease_is_live(dataclasses.replace(record, released=True), now, now)
    assert not rt.lease_is_live(dataclasses.replace(record, expires=now - 1), now, now)
    gone = int(Path("/proc/sys/kernel/pid_max").read_text())  # pids stay below it
    assert not rt.lease_is_live(dataclasses.replace(record, process={**this_process(), "pid": gone}), now, now)
    assert rt.lease_is_live(None, now - 60, now) and not rt.lease_is_live(None, now - rt.TORN_LEASE_S - 1, now)


def cache_file(stem: str, index: bool, mtime: float) -> rt.CacheFile:
    rel = f"{CACHE}/index/{stem}.parquet" if index else f"{CACHE}/blobs/{stem}.u8"
    return rt.CacheFile("gorner98", stem, rt.Item(rel, 10, mtime), index)


def test_cache_entries_stay_while_a_kept_or_listed_document_needs_them():
    now, old, new = 10_000.0, 100.0, 9_990.0
    files = [cache_file(s, i, t) for s, t in (("a", old), ("b", old), ("c", old), ("f", new)) for i in (True, False)]
    files += [cache_file("d", False, old), cache_file("e", False, new)]
    key = rt.document_key
    indexes = {f"{CACHE}/index/{stem}.parquet": rows for stem, rows in (
        ("a", rt.IndexRows(frozenset({"a"}), frozenset({key("u1", "i1")}))),
        ("b", rt.IndexRows(frozenset({"b"}), frozenset({key("u2", "i2")}))),
        ("c", rt.IndexRows(frozenset({"c"}), None)),  # damaged: it may hold anything
        ("f", rt.IndexRows(frozenset({"f"}), frozenset({key("u3", "i3")}))))}
    needed = frozenset({key("u1", "i1"), key("u2", "another identity")})
    kept = rt.kept_cache(files, indexes, needed, 1_000.0, now)
    assert {f.stem for f in files if f.item.rel not in kept} == {"b", "d"}  # old, and nothing needs them
    assert rt.kept_cache(files, indexes, None, 1_000.0, now) == {f.item.rel for f in files}  # listing failed


def node(rel: str, mtime: float = 100.0, size: int = 1, directory: bool = False) -> rt.Node:
    return rt.Node(rel, size, mtime, directory)


def test_a_dataset_root_listing_reads_as_datasets_segments_and_cache_files():
    d, legacy, foreign, seg = "0123456789abcdef", "1" * 16, "2" * 16, "a" * 16
    nodes = [node(d, directory=True), node(f"{d}/versions/v000001/manifest.json", 50.0),
             node(f"{d}/versions/v000002", directory=True), node(f"{d}/versions/latest/manifest.json"),
             node(f"{d}/segments/{seg}/train-w0000-s00000000.arrow", 40.0, 7),
             node(f"{d}/segments/{seg}/segment.json", 60.0),
             node(f"{legacy}/manifest.json"), node(f"{legacy}/train-w0000-s00000000.arrow", size=5),
             node(f"{foreign}/notes.txt"), node("elsewhere/manifest.json"),
             node(f"{CACHE}/blobs/b1.u8", size=3), node(f"{CACHE}/index/b1.parquet"),
             node(f"{CACHE}/blobs/b2.u8.tmp-0a1b"),
             node("documents/v1/gorner98/blobs/old.u8")]
    root = rt.parse_dataset_root(nodes)
    (dataset,) = root.rows3
    assert [(v.number, v.written, v.item.first, v.item.newest) for v in dataset.versions] == [
        (1, 50.0, (f"{d}/versions/v000001/manifest.json",), 50.0), (2, None, (), None)]
    (segment,) = dataset.segments
    assert (segment.id, segment.complete, segment.item.size, segment.item.newest) == (seg, True, 8, 60.0)
    assert segment.item.first == (f"{d}/segments/{seg}/segment.json",)
    assert [(x.item.rel, x.complete, x.item.size) for x in root.legacy] == [(legacy, True, 6)]  # not the foreign one
    assert sorted((f.stem, f.index) for f in root.cache) == [("b1", False), ("b1", True), ("b2.u8.tmp-0a1b", False)]


def test_a_registry_listing_reads_as_versions_candidates_and_rejected_records():
    nodes = [node("versions/v0001/model.pt", size=10), node("versions/v0001/version.json"),
             node("versions/v0002/model.pt"), node("versions/latest/model.pt"),
             node(f"candidates/{ROUNDS[1]}/checkpoint_000000001_0001_ab/model.pt", size=4),
             node("candidates/my-own-run/x"), node(f"rejected/{ROUNDS[1]}.json"), node("published.json"),
             node("lease/000001.json")]
    listing = rt.parse_registry(nodes)
    assert set(listing.versions) == {"v0001", "v0002"}
    assert listing.versions["v0001"].first == ("versions/v0001/version.json",) and not listing.versions["v0002"].first
    assert set(listing.candidates) == {ROUNDS[1], "my-own-run"} and listing.candidates[ROUNDS[1]].size == 4
    assert set(listing.rejected) == {ROUNDS[1]}


def test_removal_goes_kind_by_kind_commit_files_first_and_stops_once_the_lease_is_lost(monkeypatch):
    calls = []
    monkeypatch.setattr(rt, "_remove_urls", lambda store, urls: calls.append(list(urls)))
    removals = [rt.Removal("segments", "s", ("s/segment.json",), ("s",), 1),
                rt.Removal("blobs", "b.u8", ("b.parquet",), ("b.u8",), 1),
                rt.Removal("dataset_versions", "v1", ("v1/manifest.json",), ("v1",), 1),
                rt.Removal("dataset_versions", "v2", ("v2/manifest.json",), ("v2",), 1),
                rt.Removal("model_versions", "m1", ("m1/version.json",), ("m1",), 1)]
    rt.remove(removals, {kind: Store() for kind in rt.KINDS}, None)
    assert calls == [["m1/version.json"], ["m1"], ["v1/manifest.json", "v2/manifest.json"], ["v1", "v2"],
                     ["s/segment.json"], ["s"], ["b.parquet"], ["b.u8"]]

    class Lost:
        def check(self):
            raise RegistryBusy("lost the lease")

    calls.clear()
    with pytest.raises(RegistryBusy):
        rt.remove(removals, {kind: Store() for kind in rt.KINDS}, Lost())
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Command line, without datasets


def small_args(tmp_path: Path, *extra: str) -> list[str]:
    write_corpus(tmp_path / "corpus", documents=2, lines=5)
    return ["--spec", SMOKE, "--set", f"data.sources=[{tmp_path / 'corpus'}]",
            "--set", f"data.dataset_root={tmp_path / 'ds'}", "--set", f"run.storage={tmp_path / 'runs'}",
            "--set", "retrain.model=m", "--set", "retrain.keep_rounds=1", *extra]


def test_apply_is_busy_while_another_writer_holds_the_registry_lease_and_a_dry_run_is_not(tmp_path):
    args = small_args(tmp_path)
    registry = ModelRegistry(str(tmp_path / "runs" / "models" / "m"), Store())
    for name in ROUNDS[:2]:
        put(Store(), join(registry.url, "rejected", f"{name}.json"), b"{}")
    with registry.lease(60):
        with pytest.raises(RegistryBusy) as busy:
            gc([*args, "--apply"])
        assert gc(args)["removed"]["rejected"] == 1
    assert busy.value.exit_status == 75 and (tmp_path / f"runs/models/m/rejected/{ROUNDS[0]}.json").exists()
    spec = load_spec(SMOKE, args[3::2])
    with registry.lease(60) as lease:  # as retrain calls it, holding the lease already
        report = rt.collect(spec, registry, True, 0.0, lease)
    assert report.action == "applied" and report.removed.rejected == 1 and report.kept.rejected == 1
    assert not (tmp_path / f"runs/models/m/rejected/{ROUNDS[0]}.json").exists()


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="spec file not found"):
        gc(["--spec", str(tmp_path / "missing.yaml")])
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match="cannot list s3://nowhere/runs.*check storage.endpoint_url") as info:
        gc(small_args(tmp_path, "--set", "run.storage=s3://nowhere/runs", "--set", "data.dataset_root=s3://nowhere/ds",
                      "--set", f"storage.endpoint_url={closed}", "--set", "storage.max_attempts=1"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Real datasets, a registry and runs


@dataclass(frozen=True)
class Built:
    """A corpus built three times on a real Ray: v1 (segment A), one document X added (v2: A, B), X
    rewritten (v3: A, C); each build encoded its new documents into one blob."""

    corpus: Path
    datasets: Path
    directory: str  # the rows/3 dataset directory's name
    segments: tuple[str, str, str]  # A, B, C
    blobs: tuple[str, str, str]  # the blob of each build


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory) -> Built:
    base = tmp_path_factory.mktemp("gc-built")
    corpus, blobs_dir = base / "corpus", base / "datasets" / CACHE / "blobs"
    write_corpus(corpus, documents=8, lines=60)
    request = DatasetRequest([str(corpus)], "gorner98", 8, 4, 2, 0.25, 1, str(base / "datasets"))
    urls, blobs = [], []
    for step in range(3):
        if step:
            write_corpus(corpus, documents=1, lines=80, seed=20 + step, prefix="extra")
        before = set(os.listdir(blobs_dir)) if blobs_dir.exists() else set()
        urls.append(build_dataset(request).url)
        (blob,) = set(os.listdir(blobs_dir)) - before
        blobs.append(blob[:-3])
    a, b, c = ([s.id for s in load_manifest(url).segments] for url in urls)
    assert len(a) == 1 and b == [*a, b[1]] and c == [*a, c[1]] and c[1] != b[1], (a, b, c)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["v000001", "v000002", "v000003"]
    return Built(corpus, base / "datasets", urls[0].split("/")[-3], (a[0], b[1], c[1]), tuple(blobs))


@dataclass(frozen=True)
class Scenario:
    root: str
    store: Store
    args: list[str]
    registry: ModelRegistry
    readable: tuple[str, ...]  # dataset URLs that must stay readable
    gone: tuple[str, ...]  # paths below root that retention removes
    removed: dict
    kept: dict


def put(store: Store, url: str, data: bytes) -> None:
    fs, path = store.fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def put_checkpoint(store: Store, run: str, step: int, dataset: str) -> None:
    buffer = io.BytesIO()
    torch.save({"format": "charnn.checkpoint/1", "step": step, "dataset": {"url": dataset}}, buffer)
    put(store, join(run, f"checkpoint_{step:09d}_0001_{step:08x}", "model.pt"), buffer.getvalue())


def copy_tree(store: Store, local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        put(store, join(url, str(path.relative_to(local))), path.read_bytes())


def put_legacy(store: Store, built: Built, url: str) -> None:
    """A charnn.rows/2 dataset directory: segment A's shards and sources under a rows/2 manifest."""
    directory = built.datasets / built.directory
    record = load_segment(str(directory), built.segments[0])
    first = load_manifest(str(directory / "versions" / "v000001"))
    manifest = dataclasses.replace(first, splits=record.splits, documents=record.documents, format="charnn.rows/2",
                                   segments=(), version=0, waiting=0)
    for path in (directory / "segments" / built.segments[0]).iterdir():
        if path.name != "segment.json":
            put(store, join(url, path.name), path.read_bytes())
    put(store, join(url, "manifest.json"), manifest.to_json())


def tiny_checkpoint(tmp_path: Path) -> str:
    model = CharGRU(ModelShape(98, 8, 1))
    directory = tmp_path / "published-checkpoint"
    directory.mkdir(exist_ok=True)
    torch.save({"format": "charnn.checkpoint/1", "model": model.state_dict(), "shape": model.shape.to_dict(),
                "alphabet": "gorner98"}, directory / "model.pt")
    return str(directory)


def put_registry(store: Store, runs: str, checkpoint: str, datasets: dict) -> ModelRegistry:
    """Versions v0001 (on v2), v0002 (on v1, published again after v0003), v0003 (on v3), v0004 half
    written; candidates and rejected records of five rounds; a candidate of the operator's own."""
    registry = ModelRegistry(join(runs, "models", "m"), store)
    with registry.lease(60) as lease:
        for dataset in (datasets["v2"], datasets["v1"], datasets["v3"]):
            registry.publish(checkpoint, VersionInfo(dataset=DatasetInfo(url=dataset)), lease,
                             replaces=registry.published())
    pointer = json.loads(store.read(join(registry.url, "published.json")))
    store.write(join(registry.url, "published.json"), json.dumps({**pointer, "version": "v0002"}).encode())
    put(store, join(registry.url, "versions", "v0004", "model.pt"), b"a publish that died")
    for name, dataset in ((ROUNDS[1], "v2"), (ROUNDS[2], "v1"), (ROUNDS[3], "v3"), (ROUNDS[4], "v1"),
                          ("my-own-run", "legacy-3")):
        put_checkpoint(store, join(registry.url, "candidates", name), 10, datasets[dataset])
    for name in (ROUNDS[0], ROUNDS[1], ROUNDS[3]):
        put(store, join(registry.url, "rejected", f"{name}.json"), b'{"reason": "test"}')
    live = {"owner": "a retrain", "expires": time.time() + 3600, "released": False, "acquired": time.time(),
            "process": this_process()}
    put(store, join(registry.url, "candidates", ROUNDS[2], "lease", "000001.json"), json.dumps(live).encode())
    return registry


def put_runs(store: Store, runs: str, datasets: dict) -> None:
    """A user run (never removed) whose checkpoints name legacy-1 and v1; another model's version on legacy-2."""
    put_checkpoint(store, join(runs, "user-run"), 10, datasets["legacy-1"])
    put_checkpoint(store, join(runs, "user-run"), 20, datasets["v1"])
    put(store, join(runs, "models", "other", "versions", "v0001", "version.json"),
        json.dumps({"dataset": {"url": datasets["legacy-2"]}}).encode())


def put_unfinished(store: Store, built: Built, datasets: str, mark: str) -> list[str]:
    """A version directory without manifest, a segment without segment.json, a blob without index file."""
    d = built.directory
    files = [f"{d}/versions/v00000{4 if mark == '0' else 5}/manifest.json.tmp-0a0a",
             f"{d}/segments/{('e' if mark == '0' else 'f') * 16}/train-w0000-s00000000.arrow",
             f"{CACHE}/blobs/{mark * 32}.u8"]
    for rel in files:
        put(store, join(datasets, rel), b"\1" * 10)
    return [f"datasets/{rel.rsplit('/', 1)[0]}" for rel in files[:2]] + [f"datasets/{files[2]}"]


def scenario(built: Built, store: Store, root: str, tmp_path: Path, young: bool) -> Scenario:
    datasets, runs, d = join(root, "datasets"), join(root, "runs"), built.directory
    copy_tree(store, built.datasets, datasets)
    urls = {f"v{n}": join(datasets, d, "versions", f"v00000{n}") for n in (1, 2, 3)}
    urls |= {f"legacy-{n}": join(datasets, str(n) * 16) for n in (1, 2, 3, 4)}
    for n in (1, 2, 3, 4):
        put_legacy(store, built, urls[f"legacy-{n}"])
    stale = put_unfinished(store, built, datasets, "0")
    if "://" not in root:  # all of it written two hours ago
        for path in Path(root).rglob("*"):
            os.utime(path, (time.time() - 7200,) * 2)
    if young:
        put_unfinished(store, built, datasets, "f")
    registry = put_registry(store, runs, tiny_checkpoint(tmp_path), urls)
    put_runs(store, runs, urls)
    endpoint = ["--set", f"storage.endpoint_url={store.endpoint_url}"] if store.endpoint_url else []
    args = ["--spec", SMOKE, "--set", f"data.sources=[{built.corpus}]", "--set", f"data.dataset_root={datasets}",
            "--set", f"run.storage={runs}", "--set", "data.seq_len=8", "--set", "data.val_fraction=0.25",
            "--set", "data.shard_mb=1", "--set", "train.batch_per_worker=2", "--set", "retrain.model=m",
            "--set", "retrain.keep_versions=2", "--set", "retrain.keep_rounds=2", *endpoint]
    m = "runs/models/m"
    gone = (f"{m}/versions/v0001", f"{m}/versions/v0004", f"{m}/candidates/{ROUNDS[1]}",
            f"{m}/rejected/{ROUNDS[0]}.json", f"{m}/rejected/{ROUNDS[1]}.json", f"datasets/{d}/versions/v000002",
            f"datasets/{'4' * 16}", f"datasets/{d}/segments/{built.segments[1]}",
            f"datasets/{CACHE}/blobs/{built.blobs[1]}.u8", f"datasets/{CACHE}/index/{built.blobs[1]}.parquet", *stale)
    removed = dict(model_versions=2, candidates=1, rejected=2, dataset_versions=2, datasets=1, segments=2, blobs=2)
    kept = dict(model_versions=2, candidates=4, rejected=1, dataset_versions=2 + young, datasets=3,
                segments=2 + young, blobs=2 + young)
    readable = (urls["v1"], urls["v3"], urls["legacy-1"], urls["legacy-2"], urls["legacy-3"])
    return Scenario(root, store, args, registry, readable, gone, removed, kept)


def snapshot(s: Scenario) -> dict[str, int]:
    """Every file below the scenario's root and its size (lease records and lock files aside: each job
    writes its own)."""
    fs, base = s.store.fs(s.root)
    fs.invalidate_cache()
    return {name[len(base) + 1:]: info["size"] for name, info in fs.find(base, detail=True).items()
            if "/lease/" not in name and not name.endswith("/.lock")}


def expected_gone(before: dict[str, int], s: Scenario) -> set[str]:
    return {f for f in before if any(f == g or f.startswith(g + "/") for g in s.gone)}


def check_kept(s: Scenario, before: dict[str, int]) -> set[str]:
    """Nothing kept is lost, nothing else appeared, every kept dataset reads whole and the published
    model loads; the files removed so far."""
    now = snapshot(s)
    assert set(before) - expected_gone(before, s) <= set(now) <= set(before)
    for url in s.readable:
        read_whole(s, url)
    model, payload = load_model(s.registry.published().url, s.store)
    assert payload["alphabet"] == "gorner98" and s.registry.published().name == "v0002"
    return set(before) - set(now)


def read_whole(s: Scenario, url: str) -> None:
    manifest = load_manifest(url, s.store)
    manifest.sources(s.store)
    for split in ("train", "val"):
        for rank in range(2):
            windows = list(SplitReader(url, manifest, split, rank, 2, s.store).windows())
            assert len(windows) == manifest.splits[split].steps > 0


def check_whole(s: Scenario) -> None:
    """Whatever still has its commit file is whole, kept or not: a removal cut short leaves nothing
    that looks finished but is not (a version without its segments, an index entry without its blob)."""
    files = snapshot(s)
    for rel in files:
        folder = join(s.root, rel.rsplit("/", 1)[0])
        if rel.startswith("datasets/") and rel.endswith(f"/{MANIFEST}"):
            read_whole(s, folder)
        elif rel.endswith(f"/{SEGMENT}"):
            record = load_segment(folder.rsplit(f"/{SEGMENTS}/", 1)[0], folder.rsplit("/", 1)[1], s.store)
            parts = [h.path for split in record.splits.values() for h in split.shards] + [SOURCES]
            assert {f"{rel.rsplit('/', 1)[0]}/{p}" for p in parts} <= set(files), rel
        elif f"{CACHE}/index/" in rel:
            assert rel.replace("/index/", "/blobs/").removesuffix(".parquet") + ".u8" in files, rel
        elif rel.startswith("runs/models/m/versions/") and rel.endswith("/version.json"):
            load_model(folder, s.store)


@pytest.mark.ray
def test_a_dry_run_changes_nothing_and_apply_removes_exactly_what_nothing_needs(built, tmp_path):
    s = scenario(built, Store(), str(tmp_path / "work"), tmp_path, young=True)
    before = snapshot(s)
    dry = gc(s.args)
    assert snapshot(s) == before
    assert (dry["action"], dry["removed"], dry["kept"]) == ("dry-run", s.removed, s.kept)
    assert dry["bytes"] == sum(before[f] for f in expected_gone(before, s)) and dry["warnings"] == []
    applied = gc([*s.args, "--apply"])
    assert (applied["action"], applied["removed"], applied["kept"]) == ("applied", s.removed, s.kept)
    assert check_kept(s, before) == expected_gone(before, s)
    assert load_model(join(s.registry.url, "versions", "v0003"), s.store)[1]["alphabet"] == "gorner98"
    again = gc([*s.args, "--apply"])
    assert sum(again["removed"].values()) == 0 and again["kept"] == s.kept
    # the next build grows from the newest version, which stayed
    added = write_corpus(built.corpus, documents=1, lines=80, seed=40, prefix="late")
    try:
        root = str(tmp_path / "work" / "datasets")
        grown = build_dataset(DatasetRequest([str(built.corpus)], "gorner98", 8, 4, 2, 0.25, 1, root))
    finally:
        added[0].unlink()
    assert grown.version == 6 and [s.id for s in grown.segments][:2] == [built.segments[0], built.segments[2]]


@pytest.mark.ray
def test_on_s3_apply_removes_the_same_and_keeps_everything_readable(built, tmp_path, moto_s3, bucket):
    s = scenario(built, Store(endpoint_url=moto_s3.endpoint), f"s3://{bucket}/work", tmp_path, young=False)
    before = snapshot(s)
    applied = gc([*s.args, "--apply", "--min-age-minutes", "0"])
    assert (applied["action"], applied["removed"], applied["kept"]) == ("applied", s.removed, s.kept)
    assert check_kept(s, before) == expected_gone(before, s)


# Runs charnn-gc with every file removal announced and slowed, so that the test can kill it between any two.
ANNOUNCED = r"""
import os, sys, time

def announced(real):
    def call(path, *args, **kwargs):
        print(f"gc-test: removing {path}", flush=True)
        time.sleep(0.02)
        return real(path, *args, **kwargs)
    return call

os.remove, os.unlink, os.rmdir = announced(os.remove), announced(os.unlink), announced(os.rmdir)
sys.argv[0] = "charnn-gc"
from charnn.cli.gc import main
main()
"""


def apply_killed(s: Scenario, after: int | None, log: Path) -> tuple[int, list[str]]:
    """charnn-gc --apply in a process of its own, SIGKILLed as it announces removal number ``after``
    (None: left to finish); (its exit status, its stdout lines)."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", ANNOUNCED, *s.args, "--apply"], stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env={**os.environ, **LOOPBACK_ENV}, cwd=REPO)
        lines, seen = [], 0
        for line in proc.stdout:
            lines.append(line)
            seen += line.startswith("gc-test: removing")
            if after is not None and seen >= after:
                proc.kill()
                break
        proc.stdout.close()
        return proc.wait(timeout=120), lines


@pytest.mark.ray
def test_apply_killed_at_any_point_loses_nothing_kept_and_the_next_run_finishes(built, tmp_path):
    s = scenario(built, Store(), str(tmp_path / "work"), tmp_path, young=True)
    before, removed, killed, partial = snapshot(s), set(), 0, 0
    check_whole(s)
    # a full run announces 32 removals: the lease's write probe first, then 31 of the scenario's files
    for after in (4, 10, 18):
        status, _ = apply_killed(s, after, tmp_path / f"stderr-{after}.txt")
        now = check_kept(s, before)
        check_whole(s)
        assert now >= removed, "a file came back"
        removed, killed = now, killed + (status == -9)
        partial += 0 < len(now) < len(expected_gone(before, s))
        if status == 0:
            break
    assert killed >= 3 and partial >= 3, "too few kills landed while files were being removed"
    status, lines = apply_killed(s, None, tmp_path / "stderr-last.txt")
    assert status == 0, (tmp_path / "stderr-last.txt").read_text()[-3000:]
    result = last_json("".join(lines))
    assert result["action"] == "applied" and result["kept"] == s.kept
    assert check_kept(s, before) == expected_gone(before, s)
    assert sum(gc(s.args)["removed"].values()) == 0
