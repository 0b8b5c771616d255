"""The model registry: immutable versions, one published pointer, and a lease for writers.

Layout under ``<run.storage>/models/<name>/``::

    versions/v0001/model.pt        the weights, shape, alphabet, spec and dataset (a checkpoint's model.pt)
    versions/v0001/sources.parquet the documents it was trained on (url, url_key, identity, split)
    versions/v0001/version.json    metrics, dataset, provenance; written last
    published.json                 {"version": "v0001", "fence": 3, "owner": ...}: replaced in one write
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

import pyarrow.parquet as pq

from charnn.checkpoint import MODEL_FILE
from charnn.lease import Lease, LeaseBusy, LeasedDirectory, LeaseError
from charnn.storage import (Store, create_exclusive, describe_error, join, read_tagged, replace_if_match, url_key,
                            write_bytes_atomic)

POINTER = "published.json"
VERSION_FILE = "version.json"
SOURCES_FILE = "sources.parquet"  # the documents the version was trained on


class RegistryError(LeaseError):
    """A registry that cannot be read or written; the message names the object and the fix."""


class RegistryBusy(LeaseBusy):
    """Another writer holds the model's lease, or published meanwhile."""


VERSION_NAME = re.compile(r"v\d{4,9}")  # what publish() names versions; anything else in a pointer is refused


@dataclass(frozen=True)
class Version:
    name: str  # v0001
    url: str  # the version directory: a loadable checkpoint (model.pt)
    info: dict  # version.json
    store: Store = Store()
    # The tag of published.json when this version was read from it: publish(replaces=...) moves the
    # pointer only if it is still that object, so a candidate replaces exactly the model it beat.
    pointer_tag: str | None = field(default=None, compare=False)

    @property
    def sources_url(self) -> str | None:
        """Its documents' table (url, url_key, identity, split), if it has one (versions before it
        listed them in version.json)."""
        return None if self.info.get("dataset", {}).get("sources") is not None else join(self.url, SOURCES_FILE)

    def sources(self) -> dict[str, str]:
        """{url_key: content identity} of the documents the version was trained on.  Tables without a
        url_key (older versions) stored masked URLs: a masked one then matches no document, which
        counts as changed, never as the same (``charnn.storage.url_key``)."""
        if self.sources_url is None:
            return {url_key(s["url"]): s["identity"] for s in self.info["dataset"]["sources"]}
        fs, path = self.store.fs(self.sources_url)
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            keys = (table.column("url_key").to_pylist() if "url_key" in table.column_names
                    else [url_key(u) for u in table.column("url").to_pylist()])
            return dict(zip(keys, table.column("identity").to_pylist()))
        except FileNotFoundError:
            raise RegistryError(f"{self.url} has no {SOURCES_FILE}: not a complete version; publish another") from None
        except Exception as exc:  # noqa: BLE001 - damaged (pyarrow) or unreachable (any backend): one line
            raise RegistryError(f"cannot read the documents of version {self.name}: "
                                f"{describe_error(self.sources_url, exc)}; restore that file, or publish another "
                                f"version") from None


def _read_json(fs, path: str, what: str) -> dict:
    """The JSON object at ``path``; FileNotFoundError if there is none."""
    return _parse_json(fs.cat_file(path), path, what)


def _parse_json(data: bytes, path: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{what} {path} is not valid JSON ({exc}); restore it or delete it") from None


def _fence(pointer: Any) -> int:
    """The lease number a pointer was written under; 0 for a pointer from before fences."""
    return int(pointer.get("fence") or 0) if isinstance(pointer, dict) else 0


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
            name = pointer.get("version") if isinstance(pointer, dict) else None
            return dataclasses.replace(self.version(name), pointer_tag=tag)
        return self._guard("read the model registry", read)

    def version(self, name: Any) -> Version:
        if not isinstance(name, str) or not VERSION_NAME.fullmatch(name):
            raise RegistryError(f"{self.url}/{POINTER} names version {str(name)[:60]!r}, which is not a version "
                                f"name (v0001, v0002, ...); point {POINTER} at a version under versions/")
        url = join(self.url, "versions", name)

        def read():
            try:
                return _read_json(self.fs, f"{self.path}/versions/{name}/{VERSION_FILE}", "version")
            except FileNotFoundError:
                raise RegistryError(f"{self.url}/{POINTER} names version {name}, which has no {VERSION_FILE}; "
                                    f"point {POINTER} at a complete version") from None
        return Version(name, url, self._guard("read a model version", read), self.store)

    def versions(self) -> list[str]:
        def names():
            self.fs.invalidate_cache()
            directory = f"{self.path}/versions"
            if not self.fs.exists(directory):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False))
        return self._guard("list model versions", names)

    def _read_pointer(self) -> tuple[dict | None, str | None]:
        """(published.json, its tag), or (None, None) when nothing was published."""
        path = f"{self.path}/{POINTER}"
        try:
            data, tag, _ = read_tagged(self.fs, path)
        except FileNotFoundError:
            return None, None
        return _parse_json(data, path, "registry pointer"), tag

    def _fence(self) -> int:
        return _fence(self._read_pointer()[0])

    def _holds(self, path: str, data: bytes) -> bool:
        """Whether ``path`` holds exactly ``data``: a create or replace of ours that S3 stored, but whose
        reply was lost, so that botocore's retry met our own object (412)."""
        try:
            return self.fs.cat_file(path) == data
        except FileNotFoundError:
            return False

    def publish(self, checkpoint_url: str, info: dict, lease: "Lease", *, replaces: Version | None,
                files: dict[str, bytes] | None = None) -> Version:
        """Copy a checkpoint's weights and ``files`` (name: content) into a new immutable version,
        then move the pointer to it, only if the pointer still names ``replaces`` (the version the
        candidate was compared with, as ``published()`` returned it; None: nothing published)."""
        lease.check()  # a writer that lost its lease must not take a version number from the holder
        existing = [int(n[1:]) for n in self.versions() if n.startswith("v") and n[1:].isdigit()]
        name = f"v{max(existing, default=0) + 1:04d}"
        src_fs, src_path = self.store.fs(join(checkpoint_url, MODEL_FILE))
        info = {**info, "version": name, "published_at": time.time()}

        def write():
            base = f"{self.path}/versions/{name}"
            self._create_version_file(name, f"{base}/{MODEL_FILE}", src_fs.cat_file(src_path))
            for file, data in (files or {}).items():
                self._create_version_file(name, f"{base}/{file}", data)
            self._create_version_file(name, f"{base}/{VERSION_FILE}", json.dumps(info, indent=1).encode())
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
        body = json.dumps({"version": name, "fence": lease.number, "owner": lease.owner,
                           "published_at": time.time()}).encode()
        if replace_if_match(self.fs, path, body, expected, self._lock) is None and not self._holds(path, body):
            raise RegistryBusy(f"{self.url}/{POINTER} changed while this job published {name}: another writer "
                               f"published meanwhile; the pointer was left as it is")

    def _moved_message(self, name: str, current: dict | None, replaces: Version | None) -> str:
        now = current.get("version") if isinstance(current, dict) else None
        return (f"{self.url}/{POINTER} names {now or 'nothing'} since this job compared its candidate with "
                f"{replaces.name if replaces else 'nothing published'}: another writer published meanwhile; "
                f"{name} was written but not published, and the pointer was left as it is")

    def _refuse_newer(self, current: dict | None, lease: "Lease") -> None:
        fence = _fence(current)
        if fence > lease.number or (fence == lease.number and current.get("owner") not in (None, lease.owner)):
            raise RegistryBusy(f"{self.url}/{POINTER} names {current.get('version')}, published under lease {fence}, "
                               f"and this job holds lease {lease.number}: a newer writer published; "
                               f"the pointer was left as it is")

    def reject(self, candidate: str, info: dict, lease: "Lease | None" = None) -> str:
        """Record a candidate that was not published; only while ``lease`` (by default the lease
        this registry object holds) is still held."""
        holder = lease or self._held
        if holder is None:
            raise RegistryBusy(f"recording a rejected candidate in {self.url} needs the registry's lease; "
                               f"nothing was written")
        holder.check()
        url = join(self.url, "rejected", f"{candidate}.json")
        self._guard("record a rejected candidate",
                    lambda: write_bytes_atomic(self.fs, f"{self.path}/rejected/{candidate}.json",
                                               json.dumps(info, indent=1).encode()))
        return url

