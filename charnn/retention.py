"""Retention: what the model registry and the dataset root keep, what may go, and removing it.

Kept (``charnn-gc``, and ``collect`` for a retrain that ends holding the registry's lease):

- model versions: the published one and the newest others, ``retrain.keep_versions`` in all; a
  version directory without ``version.json`` (a publish that died) goes;
- candidate runs and rejected records of the last ``retrain.keep_rounds`` rounds (a round is one
  candidate run name, ``%Y%m%d-%H%M%S-<6 hex>``, which sorts as time does), and every candidate whose
  run lease is live; names of any other form are never touched;
- dataset versions named by a kept model version, by a checkpoint of a kept candidate, of a user run
  (``<run.storage>/<run>/``, never removed: it may be resumed) or of another model's registry under
  ``<run.storage>/models/`` (left alone); the newest complete version of every ``charnn.rows/3``
  dataset (the next build grows from it); and every version a reader may have picked as the newest
  since a live lease holder took its lease, or in the last ``min_age_s`` (a build that started then
  may still grow from it);
- the segments that a kept version names; ``charnn.rows/1-2`` dataset directories that something names;
- document-cache entries (an index file and the blob it names) that hold a document of a kept dataset
  or one listed in ``data.sources`` now (matched by url_key and content identity).

Anything else that is younger than ``min_age_s`` stays too: a build running now may be writing it (a
segment without ``segment.json``, a version directory without ``manifest.json``, a new blob).  Registry
objects get no such grace: their writers hold the registry's lease, which removal holds.

Removal order, so that a SIGKILL at any point loses nothing kept and a rerun finishes the work: the
kinds in ``KINDS`` order, whatever names a thing before the thing (model versions and candidates name
dataset versions, versions name segments, index files name blobs); within a kind, first every item's
*commit file* (the file whose presence makes it a version, a dataset, a segment or a cache entry:
``version.json``, ``manifest.json``, ``segment.json``, the index file), then the rest.  A thing whose
commit file is gone is unfinished to every reader, and to the next run, which removes it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from charnn.checkpoint import CheckpointError, checkpoint_names, load_payload
from charnn.config import RetrainConfig, Spec
from charnn.data.cache import CACHE_VERSION
from charnn.data.dataset import (MANIFEST, SEGMENT, SEGMENTS, SOURCES, VERSION_NAME, VERSIONS, DatasetError, Manifest,
                                 load_manifest, read_sources)
from charnn.data.sources import url_keys
from charnn.errors import CharnnError, one_line
from charnn.lease import Lease, LeasedDirectory, LeaseRecord, has_ended
from charnn.registry import VERSION_FILE, ModelRegistry, RegistryError
from charnn.registry import VERSION_NAME as MODEL_VERSION_NAME
from charnn.storage import StorageError, Store, describe_error, join, redact

KINDS = ("model_versions", "candidates", "rejected", "dataset_versions", "datasets", "segments", "blobs")
REGISTRY_KINDS = KINDS[:3]
DEFAULT_MIN_AGE_S = 3600.0
ROUND_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # charnn.cli.retrain.candidate_spec's run names
HEX16 = re.compile(r"[0-9a-f]{16}")  # a dataset directory's and a segment's name
# what a rows/1-2 build leaves in its directory: a directory holding anything else is not touched
LEGACY_FILE = re.compile(r"[\w.-]+\.arrow|sources\.parquet|manifest\.json|[\w.-]+\.tmp-[0-9a-f]+")
TORN_LEASE_S = 3600.0  # an unreadable lease record counts as live this long after it was written
BATCH = 500  # paths removed per request (S3 deletes 1000 at most); the lease is checked between batches
INDEX_READERS = 16


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Node:
    """A file or directory of a listing: its path below the listed root, size and modification time
    (``math.inf`` when the store does not say: such a thing always counts as young)."""

    rel: str
    size: int
    mtime: float
    directory: bool = False


@dataclass(frozen=True)
class Item:
    """Something that goes or stays as a whole: a directory (or file) below a root, its bytes, its
    newest file's time (None: it holds no file) and its commit file, if it has one (see the docstring)."""

    rel: str
    size: int = 0
    newest: float | None = None
    first: tuple[str, ...] = ()


@dataclass(frozen=True)
class Counts:
    model_versions: int = 0
    candidates: int = 0
    rejected: int = 0
    dataset_versions: int = 0
    datasets: int = 0
    segments: int = 0
    blobs: int = 0

    @classmethod
    def of(cls, values: Mapping[str, int]) -> "Counts":
        return cls(**{kind: int(values.get(kind, 0)) for kind in KINDS})

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


@dataclass(frozen=True)
class Removal:
    """One thing to remove: ``first`` (its commit file) goes before any ``body`` of its kind."""

    kind: str
    url: str
    first: tuple[str, ...]
    body: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class GcReport:
    """What a collection removed ("applied") or would remove ("dry-run"), and what it keeps."""

    action: str
    removals: tuple[Removal, ...]
    kept: Counts
    warnings: tuple[str, ...] = ()

    @property
    def removed(self) -> Counts:
        return Counts.of(Counter(r.kind for r in self.removals))

    @property
    def bytes_by_kind(self) -> Counts:
        sizes: Counter = Counter()
        for removal in self.removals:
            sizes[removal.kind] += removal.size
        return Counts.of(sizes)

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.removals)

    def to_json(self) -> dict:
        """The report as a JSON object (plain values), for a job's result line."""
        return {"action": self.action, "removed": asdict(self.removed), "bytes": self.bytes,
                "bytes_by_kind": asdict(self.bytes_by_kind), "kept": asdict(self.kept),
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Claims:
    """What must stay readable: dataset URLs that something kept names, and the times from which live
    lease holders may have picked the newest dataset version (``-inf``: unknown, so any)."""

    urls: frozenset[str] = frozenset()
    since: tuple[float, ...] = ()

    def __or__(self, other: "Claims") -> "Claims":
        return Claims(self.urls | other.urls, self.since + other.since)


@dataclass(frozen=True)
class Survey:
    """Part of a plan: removals, what is kept, what it claims, and where the kept documents are listed
    (sources tables of segments, rows/1-2 dataset directories)."""

    removals: tuple[Removal, ...] = ()
    kept: Counts = Counts()
    claims: Claims = Claims()
    documents: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def __add__(self, other: "Survey") -> "Survey":
        return Survey(self.removals + other.removals, self.kept + other.kept, self.claims | other.claims,
                      self.documents + other.documents, self.warnings + other.warnings)


# ---------------------------------------------------------------------------------------------
# Listings, parsed (pure)


def group(nodes: Iterable[Node], depth: int) -> dict[str, list[Node]]:
    """Nodes by the path of their first ``depth`` components (nodes less deep are left out)."""
    groups: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        parts = node.rel.split("/")
        if len(parts) >= depth:
            groups["/".join(parts[:depth])].append(node)
    return groups


def make_item(rel: str, nodes: Sequence[Node], commit: str | None = None) -> Item:
    files = [n for n in nodes if not n.directory]
    first = (f"{rel}/{commit}",) if commit and any(n.rel == f"{rel}/{commit}" for n in files) else ()
    return Item(rel, sum(n.size for n in files), max((n.mtime for n in files), default=None), first)


@dataclass(frozen=True)
class RegistryListing:
    versions: Mapping[str, Item]  # name: its directory (``first``: version.json, if it has one)
    candidates: Mapping[str, Item]  # run name: its run directory (names not of a round too: never removed)
    rejected: Mapping[str, Item]  # run name: its record (likewise)


def parse_registry(nodes: Sequence[Node]) -> RegistryListing:
    """A registry's listing; versions named otherwise than charnn names them are left out (never touched)."""
    versions, candidates, rejected = {}, {}, {}
    for rel, inner in group(nodes, 2).items():
        where, name = rel.split("/")
        is_file = any(n.rel == rel and not n.directory for n in inner)
        if where == "versions" and MODEL_VERSION_NAME.fullmatch(name) and not is_file:
            versions[name] = make_item(rel, inner, VERSION_FILE)
        elif where == "candidates" and not is_file:
            candidates[name] = make_item(rel, inner)
        elif where == "rejected" and name.endswith(".json") and is_file:
            rejected[name[:-5]] = make_item(rel, inner)
    return RegistryListing(versions, candidates, rejected)


@dataclass(frozen=True)
class DatasetVersion:
    number: int
    item: Item
    written: float | None  # when its manifest.json was written; None: it has none (unfinished)


@dataclass(frozen=True)
class Segment:
    id: str
    item: Item
    complete: bool  # it has its segment.json


@dataclass(frozen=True)
class Rows3:
    rel: str
    versions: tuple[DatasetVersion, ...]
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Legacy:
    item: Item
    complete: bool  # it has its manifest.json


@dataclass(frozen=True)
class CacheFile:
    alphabet: str
    stem: str  # the blob's id for ``<id>.u8`` and ``<id>.parquet``; the whole name for anything else
    item: Item
    index: bool


@dataclass(frozen=True)
class DatasetRoot:
    rows3: tuple[Rows3, ...]
    legacy: tuple[Legacy, ...]
    cache: tuple[CacheFile, ...]


def parse_dataset_root(nodes: Sequence[Node]) -> DatasetRoot:
    """A dataset root's listing: rows/3 datasets (a directory with versions/ or segments/), rows/1-2
    ones (only what such a build writes), and the document cache's files (``documents/v2/``)."""
    rows3, legacy = [], []
    tops = group(nodes, 1)
    for name, held in sorted(tops.items()):
        if not HEX16.fullmatch(name):
            continue
        if any(n.rel.split("/")[1:2] in ([VERSIONS], [SEGMENTS]) for n in held):
            rows3.append(_rows3(name, held))
        elif all(n.rel == name or (n.rel.count("/") == 1 and not n.directory
                                   and LEGACY_FILE.fullmatch(n.rel.split("/")[1])) for n in held):
            legacy.append(Legacy(make_item(name, held, MANIFEST), any(n.rel == f"{name}/{MANIFEST}" for n in held)))
    return DatasetRoot(tuple(rows3), tuple(legacy), _cache_files(tops.get("documents", ())))


def _rows3(name: str, held: Sequence[Node]) -> Rows3:
    versions, segments = [], []
    for rel, inner in sorted(group(held, 3).items()):
        where, leaf = rel.split("/")[1:]
        if where == VERSIONS and (match := VERSION_NAME.fullmatch(leaf)):
            manifest = [n.mtime for n in inner if n.rel == f"{rel}/{MANIFEST}" and not n.directory]
            versions.append(DatasetVersion(int(match.group(1)), make_item(rel, inner, MANIFEST),
                                           manifest[0] if manifest else None))
        elif where == SEGMENTS and HEX16.fullmatch(leaf):
            item = make_item(rel, inner, SEGMENT)
            segments.append(Segment(leaf, item, bool(item.first)))
    return Rows3(name, tuple(versions), tuple(segments))


def _cache_files(nodes: Iterable[Node]) -> tuple[CacheFile, ...]:
    files = []
    for node in nodes:
        parts = node.rel.split("/")
        if node.directory or len(parts) != 5 or parts[1] != CACHE_VERSION or parts[3] not in ("blobs", "index"):
            continue
        index = parts[3] == "index"
        suffix = ".parquet" if index else ".u8"
        stem = parts[4][:-len(suffix)] if parts[4].endswith(suffix) else parts[4]
        files.append(CacheFile(parts[2], stem, Item(node.rel, node.size, node.mtime), index))
    return tuple(files)


# ---------------------------------------------------------------------------------------------
# What is kept (pure)


def young(item: Item, min_age_s: float, now: float) -> bool:
    """Whether ``item`` changed less than ``min_age_s`` ago (one that holds no file never is)."""
    return item.newest is not None and now - item.newest < min_age_s


def kept_model_versions(complete: Iterable[str], published: str | None, keep: int) -> frozenset[str]:
    """The published version and the newest others, ``keep`` in all (the published one always)."""
    others = sorted((n for n in complete if n != published), key=lambda n: int(n[1:]), reverse=True)
    return frozenset([*([published] if published else []), *others[:max(0, keep - bool(published))]])


def kept_rounds(names: Iterable[str], keep: int) -> frozenset[str]:
    """The names among ``names`` that stay: the newest ``keep`` rounds (round names sort as their start
    times do), and every name that is not a round's (not retrain's to remove)."""
    names = set(names)
    rounds = sorted(n for n in names if ROUND_NAME.fullmatch(n))
    return frozenset((names - set(rounds)) | set(rounds[-keep:] if keep > 0 else ()))


def lease_is_live(record: LeaseRecord | None, modified: float | None, now: float) -> bool:
    """Whether a lease record (None: unreadable, ``modified``: when it was written) names a live holder:
    unreleased, unexpired, and not a process that has certainly ended on this machine."""
    if record is None:  # torn: its writer may be starting up; live for a while, like Lease's own rule
        return modified is None or now - modified < TORN_LEASE_S
    return not record.ended(now) and not has_ended(record.process)


def versions_in_use(written: Sequence[tuple[int, float]], since: float) -> set[int]:
    """The versions (number, when written) that a reader picking the newest at any moment from
    ``since`` on may hold: those written since then, and the newest one written before."""
    before = [number for number, at in written if at < since]
    return {number for number, at in written if at >= since} | ({max(before)} if before else set())


def kept_dataset_versions(dataset: Rows3, claimed: frozenset[str], since: Sequence[float], min_age_s: float,
                          now: float) -> frozenset[int]:
    """The versions of a rows/3 dataset that stay: its newest complete one, those claimed (by their path
    below the root), those in use since ``now - min_age_s`` or any of ``since``, and unfinished young ones."""
    complete = [(v.number, v.written) for v in dataset.versions if v.written is not None]
    kept = {max(number for number, _ in complete)} if complete else set()
    for start in (now - min_age_s, *since):
        kept |= versions_in_use(complete, start)
    kept |= {v.number for v in dataset.versions
             if v.item.rel in claimed or (v.written is None and young(v.item, min_age_s, now))}
    return frozenset(kept)


def kept_segments(dataset: Rows3, named: frozenset[str] | None, min_age_s: float, now: float) -> frozenset[str]:
    """The segments that a kept version names (``named``; None: unknown, so all) and young ones."""
    return frozenset(s.id for s in dataset.segments if named is None or s.id in named or young(s.item, min_age_s, now))


@dataclass(frozen=True)
class IndexRows:
    """What an index file lists: the blobs it names, and its documents as ``document_key``s
    (None: it cannot be read, so it may hold anything)."""

    blobs: frozenset[str]
    documents: frozenset[str] | None


def document_key(url_key: str, identity: str) -> str:
    return f"{url_key}\0{identity}"


def kept_cache(files: Sequence[CacheFile], indexes: Mapping[str, IndexRows], needed: frozenset[str] | None,
               min_age_s: float, now: float) -> frozenset[str]:
    """The cache files (by path below the root) that stay: index files that list a ``needed`` document
    (None: every file stays), cannot be read, or are young; and every blob a kept index file names,
    or that is young (its index file may be on its way)."""
    if needed is None:
        return frozenset(f.item.rel for f in files)
    kept_index = set()
    for f in files:
        rows = indexes.get(f.item.rel)
        if f.index and (young(f.item, min_age_s, now) or rows is None or rows.documents is None
                        or not rows.documents.isdisjoint(needed)):
            kept_index.add(f.item.rel)
    named = {(f.alphabet, blob) for f in files if f.item.rel in kept_index
             for blob in (indexes[f.item.rel].blobs if f.item.rel in indexes else {f.stem})}
    blobs = {f.item.rel for f in files
             if not f.index and ((f.alphabet, f.stem) in named or young(f.item, min_age_s, now))}
    return frozenset(kept_index | blobs)


def removal(kind: str, root: str, item: Item) -> Removal:
    url = join(root, item.rel)
    return Removal(kind, url, tuple(join(root, f) for f in item.first), (url,), item.size)


# ---------------------------------------------------------------------------------------------
# The collection


def collect(spec: Spec, registry: ModelRegistry, apply: bool, min_age_s: float = DEFAULT_MIN_AGE_S,
            lease: Lease | None = None) -> GcReport:
    """Survey the registry and the dataset root, and remove what retention lets go if ``apply``.

    Removal needs the registry's lease: ``lease`` when the caller holds it (retrain, at its end), else
    it is taken here for the duration (Busy, exit 75, when another writer holds it).  A dry run reads only."""
    if apply and lease is None:
        with registry.lease(spec.retrain.lease_minutes * 60) as held:
            return collect(spec, registry, apply, min_age_s, held)
    report = survey(spec, registry, min_age_s, lease)
    if not apply:
        return report
    remove(report.removals, {kind: registry.store if kind in REGISTRY_KINDS else Store.of(spec.storage)
                             for kind in KINDS}, lease)
    return dataclasses.replace(report, action="applied")


def survey(spec: Spec, registry: ModelRegistry, min_age_s: float, own: Lease | None = None) -> GcReport:
    """What retention keeps and removes now (nothing is written); ``own``: the registry lease this job holds."""
    now = time.time()
    models = _survey_registry(registry, spec.retrain, own, now)
    claims = models.claims | _outside_claims(Store.of(spec.storage), spec.run.storage, registry, now)
    found = models + _survey_datasets(spec, claims, min_age_s, now)
    order = sorted(found.removals, key=lambda r: (KINDS.index(r.kind), r.url))
    return GcReport("dry-run", tuple(order), found.kept, found.warnings)


def remove(removals: Sequence[Removal], stores: Mapping[str, Store], lease: Lease | None) -> None:
    """Remove in the order the module docstring gives: kind by kind, commit files first; the lease
    (if any) is checked before every batch, so a job that lost it stops removing."""
    for kind in KINDS:
        mine = [r for r in removals if r.kind == kind]
        for phase in ([u for r in mine for u in r.first], [u for r in mine for u in r.body]):
            for start in range(0, len(phase), BATCH):
                if lease is not None:
                    lease.check()
                _remove_urls(stores[kind], phase[start:start + BATCH])


def _remove_urls(store: Store, urls: Sequence[str]) -> None:
    """Remove files and directories (recursively); what is gone already (a killed run's work) is skipped.
    The URLs are of one kind, so of one root and one filesystem: one bulk request (S3 deletes 1000 at once)."""
    def rm() -> None:
        try:
            store.remove(list(urls), recursive=True)
        except FileNotFoundError:
            for url in urls:
                try:
                    store.remove(url, recursive=True)
                except FileNotFoundError:
                    pass
    _guarded("remove", urls[0], rm)


def _guarded(what: str, url: str, action: Callable):
    """``action()``, a backend's failure as one line (a missing object is the caller's to handle)."""
    try:
        return action()
    except (CharnnError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - whichever backend raised it
        raise StorageError(f"cannot {what} {describe_error(url, exc)}") from None


def _listing(store: Store, url: str) -> list[Node]:
    """Every file and directory below ``url``, in one recursive listing."""
    def find() -> list[Node]:
        base = store.path(url).rstrip("/")
        try:
            found = store.find(url, dirs=True)
        except FileNotFoundError:  # removed since exists(): nothing below it
            return []
        return [Node(name[len(base) + 1:], int(info.get("size") or 0), _mtime(info), info.get("type") == "directory")
                for name, info in found.items() if name.startswith(base + "/")]
    return _guarded("list", url, find)


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return math.inf


# ---------------------------------------------------------------------------------------------
# The registry, runs and leases


def _survey_registry(registry: ModelRegistry, retrain: RetrainConfig, own: Lease | None, now: float) -> Survey:
    store = registry.store
    listing = parse_registry(_listing(store, registry.url))
    published = registry.published()
    versions = kept_model_versions([n for n, item in listing.versions.items() if item.first],
                                   published and published.name, retrain.keep_versions)
    holders = {name: _holder_since(store, join(registry.url, "candidates", name), None, now)
               for name in listing.candidates}
    rounds = kept_rounds([*listing.candidates, *listing.rejected], retrain.keep_rounds)
    candidates = {name for name in listing.candidates if name in rounds or holders[name] is not None}
    claims = Claims(frozenset(filter(None, (_version_dataset(registry, name) for name in sorted(versions)))),
                    tuple(s for s in holders.values() if s is not None))
    for name in sorted(candidates):
        claims |= Claims(_checkpoint_datasets(store, join(registry.url, "candidates", name)))
    ours = _holder_since(store, registry.url, own, now)
    claims |= Claims(since=() if ours is None else (ours,))
    url = registry.url
    removals = [removal("model_versions", url, item) for n, item in listing.versions.items() if n not in versions]
    removals += [removal("candidates", url, item) for n, item in listing.candidates.items() if n not in candidates]
    removals += [removal("rejected", url, item) for n, item in listing.rejected.items() if n not in rounds]
    kept = Counts(model_versions=len(versions), candidates=len(candidates),
                  rejected=len(set(listing.rejected) & rounds))
    return Survey(tuple(removals), kept, claims)


def _version_dataset(registry: ModelRegistry, name: str) -> str | None:
    """The dataset URL a model version names: version.json's, else its model.pt's."""
    dataset = registry.version(name).info.dataset
    url = dataset.url if dataset is not None else None
    return url if isinstance(url, str) else _checkpoint_dataset(registry.store, join(registry.url, "versions", name))


def _checkpoint_dataset(store: Store, url: str) -> str | None:
    """The dataset URL a checkpoint's model.pt names; None for one that cannot be read (nothing resumes it).
    Read as the raw payload, not as a CheckpointMeta: a model.pt that names its dataset keeps that
    dataset whatever else it lacks."""
    try:
        payload = load_payload(url, store)
    except CheckpointError:
        return None
    dataset = payload.get("dataset")
    found = dataset.get("url") if isinstance(dataset, dict) else None
    return found if isinstance(found, str) else None


def _checkpoint_datasets(store: Store, run_url: str) -> frozenset[str]:
    """The datasets of every checkpoint of a run: a resume takes the newest good one, which need not be
    the newest (a damaged checkpoint is skipped)."""
    return frozenset(filter(None, (_checkpoint_dataset(store, join(run_url, name))
                                   for name in checkpoint_names(run_url, store))))


def _holder_since(store: Store, url: str, own: Lease | None, now: float) -> float | None:
    """When the live holder of the lease of the directory ``url`` took it (-inf: unknown), or None when
    none holds it (or ``own``, this job's lease, does)."""
    directory = LeasedDirectory(url, store)
    numbers = _guarded("list the lease of", url, directory.lease_numbers)
    if not numbers or (own is not None and own.directory.url == directory.url and own.number == numbers[-1]):
        return None
    try:
        record, _, modified = _guarded("read the lease of", url, lambda: directory.read_record(numbers[-1]))
    except FileNotFoundError:
        return None
    if not lease_is_live(record, modified, now):
        return None
    acquired = record.acquired if record else None
    return float(acquired) if acquired is not None and acquired > 0 else -math.inf


def _run_claims(store: Store, run_url: str, now: float) -> Claims:
    since = _holder_since(store, run_url, None, now)
    return Claims(_checkpoint_datasets(store, run_url), () if since is None else (since,))


def _outside_claims(store: Store, run_storage: str, registry: ModelRegistry, now: float) -> Claims:
    """What user runs and other models' registries under ``run.storage`` claim (never removed here)."""
    claims = Claims()
    for name in _guarded("list", run_storage, lambda: store.names(run_storage, directories=True)):
        url = join(run_storage, name)
        claims |= _other_registries(store, url, registry, now) if name == "models" else _run_claims(store, url, now)
    return claims


def _other_registries(store: Store, models: str, registry: ModelRegistry, now: float) -> Claims:
    claims = Claims()
    ours = store.path(registry.url).rstrip("/")
    for name in _guarded("list", models, lambda: store.names(models, directories=True)):
        url = join(models, name)
        if store.path(url).rstrip("/") == ours:
            continue
        other = ModelRegistry(url, store)
        for version in other.versions():
            if MODEL_VERSION_NAME.fullmatch(version):
                try:
                    claims |= Claims(frozenset(filter(None, [_version_dataset(other, version)])))
                except RegistryError:  # no version.json: not a version, names nothing
                    pass
        candidates = join(url, "candidates")
        for run in _guarded("list", candidates, lambda: store.names(candidates, directories=True)):
            claims |= _run_claims(store, join(candidates, run), now)
        since = _holder_since(store, url, None, now)
        claims |= Claims(since=() if since is None else (since,))
    return claims


# ---------------------------------------------------------------------------------------------
# The dataset root


@dataclass(frozen=True)
class _Context:
    store: Store
    root: str  # the dataset root's URL
    claimed: frozenset[str]  # claimed dataset URLs, as paths below the root
    since: tuple[float, ...]
    min_age_s: float
    now: float


def _survey_datasets(spec: Spec, claims: Claims, min_age_s: float, now: float) -> Survey:
    store, root = Store.of(spec.storage), spec.data.dataset_root
    parsed = parse_dataset_root(_listing(store, root))
    context = _Context(store, root, _claimed_paths(store, root, claims.urls), claims.since, min_age_s, now)
    found = Survey()
    for dataset in parsed.rows3:
        found += _survey_rows3(context, dataset)
    for legacy in parsed.legacy:
        found += _survey_legacy(context, legacy)
    needed, warnings = _needed_documents(spec, context, found.documents)
    return found + _survey_cache(context, parsed.cache, needed) + Survey(warnings=warnings)


def _claimed_paths(store: Store, root: str, urls: Iterable[str]) -> frozenset[str]:
    """The claimed URLs below ``root``, as paths below it (compared as the store resolves them)."""
    base = store.path(root).rstrip("/") + "/"
    paths = set()
    for url in urls:
        try:
            path = store.path(url).rstrip("/")
        except Exception:  # noqa: BLE001 - a URL no store here can open is not below this root
            continue
        if path.startswith(base):
            paths.add(path[len(base):])
    return frozenset(paths)


def _survey_rows3(context: _Context, dataset: Rows3) -> Survey:
    versions = kept_dataset_versions(dataset, context.claimed, context.since, context.min_age_s, context.now)
    named, warnings = _named_segments(context, dataset, versions)
    segments = kept_segments(dataset, named, context.min_age_s, context.now)
    removals = [removal("dataset_versions", context.root, v.item) for v in dataset.versions if v.number not in versions]
    removals += [removal("segments", context.root, s.item) for s in dataset.segments if s.id not in segments]
    # an unfinished segment's documents are listed (its build's) or its blobs young: only whole ones are read
    documents = tuple(join(context.root, s.item.rel, SOURCES) for s in dataset.segments if s.id in segments
                      and s.complete)
    return Survey(tuple(removals), Counts(dataset_versions=len(versions), segments=len(segments)),
                  documents=documents, warnings=warnings)


def _named_segments(context: _Context, dataset: Rows3, kept: frozenset[int]) -> tuple[frozenset[str] | None, tuple]:
    """The segments the kept complete versions name; None (and why) when a manifest cannot be read."""
    named: set[str] = set()
    for version in dataset.versions:
        if version.number not in kept or version.written is None:
            continue
        url = join(context.root, version.item.rel)
        try:
            data = _guarded("read", url, lambda: context.store.read(join(url, MANIFEST)))
            named |= {s.id for s in Manifest.from_json(url, data).segments}
        except (DatasetError, FileNotFoundError) as exc:
            return None, (f"{redact(url)}: {one_line(str(exc) or type(exc).__name__)}; every segment of its "
                          f"dataset kept",)
    return frozenset(named), ()


def _survey_legacy(context: _Context, legacy: Legacy) -> Survey:
    if legacy.item.rel in context.claimed or young(legacy.item, context.min_age_s, context.now):
        documents = (join(context.root, legacy.item.rel),) if legacy.complete else ()
        return Survey(kept=Counts(datasets=1), documents=documents)
    return Survey(removals=(removal("datasets", context.root, legacy.item),))


def _needed_documents(spec: Spec, context: _Context, holders: Sequence[str]) -> tuple[frozenset[str] | None, tuple]:
    """The documents (``document_key``s) that the cache must keep: those of kept datasets and those
    listed now; None (and why) when either cannot be known."""
    from charnn.data.build import DatasetRequest, listed_documents  # the build's module loads Ray Data

    try:
        listed = listed_documents(DatasetRequest.from_spec(spec))
    except Exception as exc:  # noqa: BLE001 - any failure to list: the cache is left as it is
        reason = one_line(str(exc)) or type(exc).__name__
        return None, (f"listing data.sources failed ({redact(reason)[:300]}); every document-cache blob kept",)
    listed = listed.filter(pc.is_valid(listed.column("identity")))
    keys = set(_keys(listed.column("url_key"), listed.column("identity")))
    for url in holders:
        try:
            table = (read_sources(url, url.rsplit("/", 1)[0], context.store) if url.endswith(f"/{SOURCES}")
                     else load_manifest(url, context.store).sources(context.store))
        except DatasetError as exc:
            return None, (f"{one_line(str(exc))}; every document-cache blob kept",)
        keys.update(_keys(table.column("url_key"), table.column("identity")))
    return frozenset(keys), ()


def _keys(url_key: pa.ChunkedArray, identity: pa.ChunkedArray) -> list[str]:
    return [document_key(k, i) for k, i in zip(url_key.to_pylist(), identity.to_pylist()) if k and i]


def _survey_cache(context: _Context, files: Sequence[CacheFile], needed: frozenset[str] | None) -> Survey:
    indexes = _read_indexes(context, [f for f in files if f.index]) if needed is not None else {}
    kept = kept_cache(files, indexes, needed, context.min_age_s, context.now)
    entries: dict[tuple[str, str], list[CacheFile]] = defaultdict(list)
    for f in files:
        entries[f.alphabet, f.stem].append(f)
    removals, stays = [], 0
    for members in entries.values():
        gone = [f for f in members if f.item.rel not in kept]
        if not gone:
            stays += 1
            continue
        first = tuple(join(context.root, f.item.rel) for f in gone if f.index)
        body = tuple(join(context.root, f.item.rel) for f in gone if not f.index)
        removals.append(Removal("blobs", (body or first)[0], first, body, sum(f.item.size for f in gone)))
    return Survey(tuple(removals), Counts(blobs=stays))


def _read_indexes(context: _Context, files: Sequence[CacheFile]) -> dict[str, IndexRows]:
    with ThreadPoolExecutor(INDEX_READERS, thread_name_prefix="charnn-gc-index") as pool:
        rows = list(pool.map(lambda f: _index_rows(context.store, join(context.root, f.item.rel), f.stem), files))
    return {f.item.rel: r for f, r in zip(files, rows)}


def _index_rows(store: Store, url: str, stem: str) -> IndexRows:
    """An index file's blobs and documents; a damaged one may hold anything (its own blob, by name)."""
    try:
        data = _guarded("read", url, lambda: store.read(url))
    except FileNotFoundError:  # removed since the listing: it names nothing any more
        return IndexRows(frozenset(), frozenset())
    try:
        table = pq.read_table(pa.BufferReader(data))
        keys = table.column("url_key") if "url_key" in table.column_names else url_keys(table.column("url"))
        return IndexRows(frozenset(table.column("blob").to_pylist()), frozenset(_keys(keys, table.column("identity"))))
    except Exception:  # noqa: BLE001 - whatever a torn or foreign file makes the reader say
        return IndexRows(frozenset({stem}), None)
