"""The model registry: immutable versions, one published pointer, and a lease for writers.

Layout under ``<run.storage>/models/<name>/``::

    versions/v0001/model.pt        the weights, shape, alphabet, spec and dataset (a checkpoint's model.pt)
    versions/v0001/sources.parquet the documents it was trained on (url, url_key, identity, split)
    versions/v0001/version.json    metrics, dataset, provenance; written last
    published.json                 {"version": "v0001", "fence": 3, "owner": ...}: a ``Pointer``, replaced in one write
    rejected/<candidate>.json      candidates that did not beat the published model
    lease/000003.json              who may write, until when
    .lock                          local disks only: serialises compare-and-swap writes

A version is written completely, each file with a create-only write (and, locally, synced to
disk with its directory), before the pointer moves; so a writer killed at any point leaves the
published model untouched.

Writers take the registry's lease first (``charnn/lease.py``: numbered create-only records,
renewed by compare-and-swap, fenced), and check it before they pick a version number.  The
pointer carries the lease number of its writer (the *fence*) and is replaced with a
compare-and-swap against the pointer that the job read when it chose the incumbent to beat
(``publish(replaces=...)``): a writer that stalls after its check cannot overwrite a newer
publication, a candidate never replaces a model it was not compared with, and no writer replaces
a pointer published under a newer lease, so the published model never goes backwards.  The next
lease number comes after the pointer's fence.  A pointer from before fences (no "fence") counts
as fence 0.

What "create-only" and "compare-and-swap" mean on each backend is in ``charnn/lease.py``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from charnn.checkpoint import MODEL_FILE
from charnn.lease import Lease, LeaseBusy, LeasedDirectory, LeaseError
from charnn.storage import Store, create_exclusive, describe_error, join, read_tagged, replace_if_match, url_key

POINTER = "published.json"
POINTER_FORMAT = 1  # the newest pointer format this code reads and writes
VERSION_FILE = "version.json"
SOURCES_FILE = "sources.parquet"  # the documents the version was trained on


class RegistryError(LeaseError):
    """A registry that cannot be read or written; the message names the object and the fix."""


class RegistryBusy(LeaseBusy):
    """Another writer holds the model's lease, or published meanwhile."""


VERSION_NAME = re.compile(r"v\d{4,9}")  # what publish() names versions; anything else in a pointer is refused


@dataclass(frozen=True)
class Pointer:
    """``published.json``: the published version and the lease it was published under (its fence).

    Format 1 is the pointer as written before pointers had a format, key for key, and carries no
    "format" key.  Keys a pointer lacks stay None, and are not written back: a pointer from before
    fences has only "version" (fence 0)."""

    version: Any  # the version's name (v0001) as found; ModelRegistry.version refuses anything else
    fence: int | None = None  # the lease number of its writer
    owner: str | None = None  # that lease's holder: tells apart two pointers written under one number
    published_at: float | None = None
    format: int = POINTER_FORMAT

    @property
    def lease_number(self) -> int:
        """The fence, 0 for a pointer from before fences: new leases come after it."""
        return self.fence or 0

    def to_json(self) -> bytes:
        keys = {"version": self.version, "fence": self.fence, "owner": self.owner, "published_at": self.published_at,
                "format": None if self.format == 1 else self.format}
        return json.dumps({key: value for key, value in keys.items() if value is not None}).encode()

    @classmethod
    def from_json(cls, data: bytes, path: str) -> "Pointer":
        """The pointer in ``data`` (read from ``path``, for messages); RegistryError if it cannot be one."""
        raw = _parse_json(data, path, "registry pointer")
        if not isinstance(raw, dict):
            return cls(None)  # names no version: ModelRegistry.version says so
        version = raw.get("format", 1)
        if not isinstance(version, int) or version > POINTER_FORMAT:
            raise RegistryError(f"registry pointer {path} has format {str(version)[:20]}, newer than this charnn "
                                f"reads ({POINTER_FORMAT}); use a newer charnn")
        try:
            fence = int(raw["fence"] or 0) if "fence" in raw else None
        except (TypeError, ValueError):
            raise RegistryError(f"registry pointer {path} has fence {str(raw['fence'])[:20]!r}, which is not a "
                                f"lease number; restore it or delete it") from None
        owner, published_at = raw.get("owner"), raw.get("published_at")
        return cls(raw.get("version"), fence, None if owner is None else str(owner),
                   published_at if isinstance(published_at, (int, float)) else None, version)


@dataclass(frozen=True)
class DatasetInfo:
    """version.json's "dataset": the dataset version it was trained on and its document count;
    versions from before sources.parquet list their documents here (``sources``)."""

    url: str | None = None
    documents: int | None = None
    sources: list | None = None  # [{"url": ..., "identity": ...}], versions before sources.parquet

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Any) -> "DatasetInfo":
        if not isinstance(raw, dict):
            return cls()
        url, documents, sources = raw.get("url"), raw.get("documents"), raw.get("sources")
        return cls(url if isinstance(url, str) else None, documents if isinstance(documents, int) else None,
                   sources if isinstance(sources, list) else None)


@dataclass(frozen=True)
class VersionInfo:
    """``version.json``, and the record of a rejected candidate (the same, with the ``reason`` it lost
    and no version).  Keys it lacks stay None and are not written, except that a candidate's record
    always names its incumbent (null: nothing was published), as the records before it did."""

    metrics: dict | None = None  # the candidate's validation figures: val_loss, val_accuracy, val_bpc
    incumbent: dict | None = None  # {"version": ..., val_loss, ...} of the model it was compared with
    candidate: str | None = None  # the candidate's checkpoint
    spec: str | dict | None = None  # the candidate run's spec, as dump_spec wrote it
    dataset: DatasetInfo | None = None
    version: str | None = None  # set by publish
    published_at: float | None = None  # set by publish
    reason: str | None = None  # a rejected candidate's: why it was not published

    @property
    def val_loss(self) -> float | None:
        return (self.metrics or {}).get("val_loss")

    def to_dict(self) -> dict:
        values = {"metrics": self.metrics, "incumbent": self.incumbent, "candidate": self.candidate, "spec": self.spec,
                  "dataset": self.dataset and self.dataset.to_dict(), "version": self.version,
                  "published_at": self.published_at, "reason": self.reason}
        return {k: v for k, v in values.items() if v is not None or (k == "incumbent" and self.candidate is not None)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, path: str) -> "VersionInfo":
        """The record in ``data`` (read from ``path``, for messages); RegistryError if it is not JSON.
        Anything but an object, and keys that are missing or of another type, read as None."""
        raw = _parse_json(data, path, "version")
        if not isinstance(raw, dict):
            return cls()

        def typed(key: str, kind: type | tuple) -> Any:
            value = raw.get(key)
            return value if isinstance(value, kind) else None
        return cls(typed("metrics", dict), typed("incumbent", dict), typed("candidate", str),
                   typed("spec", (str, dict)), DatasetInfo.from_dict(raw["dataset"]) if "dataset" in raw else None,
                   typed("version", str),
                   typed("published_at", (int, float)), typed("reason", str))


@dataclass(frozen=True)
class Version:
    name: str  # v0001
    url: str  # the version directory: a loadable checkpoint (model.pt)
    info: VersionInfo  # version.json
    store: Store
    # The tag of published.json when this version was read from it: publish(replaces=...) moves the
    # pointer only if it is still that object, so a candidate replaces exactly the model it beat.
    pointer_tag: str | None = field(default=None, compare=False)

    @property
    def sources_url(self) -> str | None:
        """Its documents' table (url, url_key, identity, split), if it has one (versions before it
        listed them in version.json)."""
        listed = self.info.dataset is not None and self.info.dataset.sources is not None
        return None if listed else join(self.url, SOURCES_FILE)

    def sources(self) -> dict[str, str]:
        """{url_key: content identity} of the documents the version was trained on.  Tables without a
        url_key (older versions) stored masked URLs: a masked one then matches no document, which
        counts as changed, never as the same (``charnn.storage.url_key``)."""
        if self.sources_url is None:
            return {url_key(s["url"]): s["identity"] for s in self.info.dataset.sources}
        try:
            table = pq.read_table(pa.BufferReader(self.store.read(self.sources_url)))
            keys = (table.column("url_key").to_pylist() if "url_key" in table.column_names
                    else [url_key(u) for u in table.column("url").to_pylist()])
            return dict(zip(keys, table.column("identity").to_pylist()))
        except FileNotFoundError:
            raise RegistryError(f"{self.url} has no {SOURCES_FILE}: not a complete version; publish another") from None
        except Exception as exc:  # noqa: BLE001 - damaged (pyarrow) or unreachable (any backend): one line
            raise RegistryError(f"cannot read the documents of version {self.name}: "
                                f"{describe_error(self.sources_url, exc)}; restore that file, or publish another "
                                f"version") from None


def _parse_json(data: bytes, path: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{what} {path} is not valid JSON ({exc}); restore it or delete it") from None


class ModelRegistry(LeasedDirectory):
    Busy = RegistryBusy
    Error = RegistryError
    writer = "retrain"

    def published(self) -> Version | None:
        """The published version, or None if nothing was ever published; it remembers the pointer
        it was read from (``publish(replaces=...)``)."""
        def read():
            self.fs.invalidate_cache()
            pointer, tag = self._read_pointer()
            if pointer is None:
                return None
            return dataclasses.replace(self.version(pointer.version), pointer_tag=tag)
        return self._guard("read the model registry", read)

    def version(self, name: Any) -> Version:
        if not isinstance(name, str) or not VERSION_NAME.fullmatch(name):
            raise RegistryError(f"{self.url}/{POINTER} names version {str(name)[:60]!r}, which is not a version "
                                f"name (v0001, v0002, ...); point {POINTER} at a version under versions/")
        url = join(self.url, "versions", name)

        def read():
            try:
                return VersionInfo.from_json(self.store.read(join(url, VERSION_FILE)),
                                             f"{self.path}/versions/{name}/{VERSION_FILE}")
            except FileNotFoundError:
                raise RegistryError(f"{self.url}/{POINTER} names version {name}, which has no {VERSION_FILE}; "
                                    f"point {POINTER} at a complete version") from None
        return Version(name, url, self._guard("read a model version", read), self.store)

    def versions(self) -> list[str]:
        directory = join(self.url, "versions")
        return self._guard("list model versions", lambda: self.store.names(directory, directories=True))

    def _read_pointer(self) -> tuple[Pointer | None, str | None]:
        """(published.json, its tag), or (None, None) when nothing was published."""
        path = f"{self.path}/{POINTER}"
        try:
            data, tag, _ = read_tagged(self.fs, path)
        except FileNotFoundError:
            return None, None
        return Pointer.from_json(data, path), tag

    def _fence(self) -> int:
        pointer = self._read_pointer()[0]
        return pointer.lease_number if pointer else 0

    def _holds(self, path: str, data: bytes) -> bool:
        """Whether ``path`` holds exactly ``data``: a create or replace of ours that S3 stored, but whose
        reply was lost, so that botocore's retry met our own object (412)."""
        try:
            return self.fs.cat_file(path) == data
        except FileNotFoundError:
            return False

    def publish(self, checkpoint_url: str, info: VersionInfo, lease: "Lease", *, replaces: Version | None,
                files: dict[str, bytes] | None = None) -> Version:
        """Copy a checkpoint's weights and ``files`` (name: content) into a new immutable version,
        then move the pointer to it, only if the pointer still names ``replaces`` (the version the
        candidate was compared with, as ``published()`` returned it; None: nothing published)."""
        lease.check()  # a writer that lost its lease must not take a version number from the holder
        existing = [int(n[1:]) for n in self.versions() if n.startswith("v") and n[1:].isdigit()]
        name = f"v{max(existing, default=0) + 1:04d}"
        info = dataclasses.replace(info, version=name, published_at=time.time(), reason=None)

        def write():
            base = f"{self.path}/versions/{name}"
            self._create_version_file(name, f"{base}/{MODEL_FILE}", self.store.read(join(checkpoint_url, MODEL_FILE)))
            for file, data in (files or {}).items():
                self._create_version_file(name, f"{base}/{file}", data)
            self._create_version_file(name, f"{base}/{VERSION_FILE}", info.to_json())
            self._move_pointer(name, lease, replaces)
        self._guard("publish a model version", write)
        return Version(name, join(self.url, "versions", name), info, self.store)

    def _create_version_file(self, name: str, path: str, data: bytes) -> None:
        try:
            create_exclusive(self.fs, path, data)
        except FileExistsError:
            if not self._holds(path, data):
                raise RegistryBusy(f"{self.url}/versions/{name} appeared while this job wrote it: another writer "
                                   f"ignores the lease; nothing was published") from None

    def _move_pointer(self, name: str, lease: "Lease", replaces: Version | None) -> None:
        """Point published.json at ``name`` with a compare-and-swap against the pointer that named
        ``replaces``: never over a publication the candidate was not compared with, nor over a
        newer lease's."""
        expected = replaces.pointer_tag if replaces else None
        current, tag = self._read_pointer()
        if tag != expected:
            raise RegistryBusy(self._moved_message(name, current, replaces))
        self._refuse_newer(current, lease)
        lease.check()  # the pointer moves only while this writer holds the lease
        path = f"{self.path}/{POINTER}"
        body = Pointer(name, lease.number, lease.owner, time.time()).to_json()
        if replace_if_match(self.fs, path, body, expected, self._lock) is None and not self._holds(path, body):
            raise RegistryBusy(f"{self.url}/{POINTER} changed while this job published {name}: another writer "
                               f"published meanwhile; the pointer was left as it is")

    def _moved_message(self, name: str, current: Pointer | None, replaces: Version | None) -> str:
        now = current.version if current else None
        return (f"{self.url}/{POINTER} names {now or 'nothing'} since this job compared its candidate with "
                f"{replaces.name if replaces else 'nothing published'}: another writer published meanwhile; "
                f"{name} was written but not published, and the pointer was left as it is")

    def _refuse_newer(self, current: Pointer | None, lease: "Lease") -> None:
        fence = current.lease_number if current else 0
        if fence > lease.number or (fence == lease.number and current.owner not in (None, lease.owner)):
            raise RegistryBusy(f"{self.url}/{POINTER} names {current.version}, published under lease {fence}, "
                               f"and this job holds lease {lease.number}: a newer writer published; "
                               f"the pointer was left as it is")

    def reject(self, candidate: str, info: VersionInfo, lease: "Lease") -> str:
        """Record a candidate that was not published (``info`` with its ``reason``); only while ``lease``
        is still held."""
        lease.check()
        url = join(self.url, "rejected", f"{candidate}.json")
        self._guard("record a rejected candidate", lambda: self.store.write(url, info.to_json()))
        return url

