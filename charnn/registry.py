"""The model registry: immutable versions, one published pointer, and a lease for writers.

Layout under ``<run.storage>/models/<name>/``::

    versions/v0001/model.pt        the weights, shape, alphabet, spec and dataset (a checkpoint's model.pt)
    versions/v0001/sources.parquet the documents it was trained on (url, identity)
    versions/v0001/version.json    metrics, dataset, provenance; written last
    published.json                 {"version": "v0001", "fence": 3, "owner": ...}: replaced in one write
    rejected/<candidate>.json      candidates that did not beat the published model
    lease/000003.json              who may write, until when
    .lock                          local disks only: serialises compare-and-swap writes

A version is written completely, each file with a create-only write (and, locally, synced to
disk with its directory), before the pointer moves; so a writer killed at any point leaves the
published model untouched.

Writers take the lease first: a numbered record created with a create-only write, so of two
writers racing for number n exactly one wins.  The next number comes after both the newest
record and the fence in published.json, so numbers never go back even if ``lease/`` is
deleted.  The holder renews its record with a compare-and-swap (only while the record is still
the one it wrote) and stops, having lost the lease, the moment it is not; it also stops after
``max_hold_s``.  The pointer carries the lease number of its writer (the *fence*) and is
replaced with a compare-and-swap against the version read before ``check()``: a writer that
stalls after its check cannot overwrite a newer publication, and no writer replaces a pointer
published under a newer lease, so the published model never goes backwards.  A pointer from
before fences (no "fence") counts as fence 0.

What "create-only" and "compare-and-swap" mean on each backend:

- Local disk: create is ``open(O_CREAT|O_EXCL)``, exclusive in the kernel, then the file and
  its directory are fsynced.  Compare-and-swap is read-compare-write inside an ``flock`` on
  ``.lock``, the new content written to a temporary file, fsynced and renamed over the old one
  (readers see the old record or the new, never a torn one).  Exclusive among all processes of
  the host.
- NFS: ``O_EXCL`` is exclusive only on NFSv3 and later (an NFSv2 client checks, then creates),
  and some servers and exports have implemented it unreliably; ``flock`` becomes a POSIX lock
  that needs the NFS lock manager (lockd on NFSv3, built into NFSv4), and a ``nolock`` mount
  makes it local to each host.  The start-up self-test cannot tell (one process's creates fail
  in turn either way): keep a registry shared by several hosts on NFSv4 with locking, or on S3.
- AWS S3: create is PutObject with ``If-None-Match: *`` (on CompleteMultipartUpload for files
  over 100 MB); compare-and-swap is PutObject with ``If-Match: <ETag>``.  Both are atomic on
  the server.  A 409 ConditionalRequestConflict (two conditional writes at once) and a 412
  without its Condition element are a lost race (RegistryBusy).  A create whose reply was lost
  and whose retry then met our own object is recognised as ours (same owner or same bytes).
- S3-compatible stores (MinIO, Ceph, ...): the same headers.  A store that ignores them would
  overwrite silently: the self-test on taking the lease (create a probe twice, then replace it
  with a wrong ETag, under ``lease/``) finds that out and refuses to write at all.
- GCS: create is gcsfs's ``ifGenerationMatch=0``, atomic on the server (not tested here: there
  is no GCS emulator in the tests).  Compare-and-swap is NOT conditional on GCS yet: renewals
  and the pointer are read, compared and written, which narrows the race but does not close it
  (lease numbers stay exclusive).  ``ifGenerationMatch=<generation>`` would close it.
- Any other fsspec store: create is fsspec's check-then-write and compare-and-swap is
  read-compare-write: neither is exclusive, and the self-test cannot tell.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from charnn.errors import Busy, UserError
from charnn.storage import (StorageError, Store, create_exclusive, describe_error, is_local, is_s3, join, read_tagged,
                            replace_if_match, write_bytes_atomic)
from charnn.checkpoint import MODEL_FILE

POINTER = "published.json"
VERSION_FILE = "version.json"
SOURCES_FILE = "sources.parquet"  # the documents (url, identity) the version was trained on
LOCK_FILE = ".lock"
DEFAULT_MAX_HOLD_S = 6 * 3600.0  # longer than any retrain should take; shorter than the nightly schedule

log = logging.getLogger("charnn.registry")


class RegistryError(UserError):
    """A registry that cannot be read or written; the message names the object and the fix."""


class RegistryBusy(Busy):
    """Another writer holds the model's lease."""


@dataclass(frozen=True)
class Version:
    name: str  # v0001
    url: str  # the version directory: a loadable checkpoint (model.pt)
    info: dict  # version.json
    store: Store = Store()

    def sources(self) -> dict[str, str]:
        """{document URL: content identity} of the dataset the version was trained on: its
        ``sources.parquet`` (versions before it listed them in version.json)."""
        inline = self.info.get("dataset", {}).get("sources")
        if inline is not None:
            return {s["url"]: s["identity"] for s in inline}
        fs, path = self.store.fs(join(self.url, SOURCES_FILE))
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["url", "identity"])
        except FileNotFoundError:
            raise RegistryError(f"{self.url} has no {SOURCES_FILE}: not a complete version; publish another") from None
        return dict(zip(table.column("url").to_pylist(), table.column("identity").to_pylist()))


def _read_json(fs, path: str, what: str) -> dict:
    """The JSON object at ``path``; FileNotFoundError if there is none."""
    return _parse_json(fs.cat_file(path), path, what)


def _parse_json(data: bytes, path: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{what} {path} is not valid JSON ({exc}); restore it or delete it") from None


def _create(fs, path: str, data: bytes, lock: str | None = None) -> str | None:
    """Write ``path`` only if it does not exist yet (FileExistsError otherwise); its tag if known."""
    return create_exclusive(fs, path, data, lock)


def _fence(pointer: Any) -> int:
    """The lease number a pointer was written under; 0 for a pointer from before fences."""
    return int(pointer.get("fence") or 0) if isinstance(pointer, dict) else 0


class ModelRegistry:
    def __init__(self, url: str, store: Store = Store()):
        self.url = url.rstrip("/")
        self.store = store
        try:
            self.fs, self.path = store.fs(self.url)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot open model registry {describe_error(self.url, exc)}") from None
        self._writes_checked = False  # the self-test of conditional writes, once per registry object
        self._held: Lease | None = None  # the lease this object holds now, for reject()

    @property
    def _lock(self) -> str | None:
        """The lock file of local compare-and-swaps (object stores compare on the server)."""
        return f"{self.path}/{LOCK_FILE}" if is_local(self.fs) else None

    def _guard(self, what: str, action):
        try:
            return action()
        except (RegistryError, RegistryBusy, FileExistsError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
            raise StorageError(f"cannot {what} {describe_error(self.url, exc)}") from None

    def published(self) -> Version | None:
        """The published version, or None if nothing was ever published."""
        def read():
            self.fs.invalidate_cache()
            try:
                pointer = _read_json(self.fs, f"{self.path}/{POINTER}", "registry pointer")
            except FileNotFoundError:
                return None
            return self.version(pointer["version"])
        return self._guard("read the model registry", read)

    def version(self, name: str) -> Version:
        url = join(self.url, "versions", name)
        try:
            info = self._guard("read a model version", lambda: _read_json(self.fs, f"{self.path}/versions/{name}/{VERSION_FILE}", "version"))
        except FileNotFoundError:
            raise RegistryError(f"{self.url}/{POINTER} names version {name}, which has no {VERSION_FILE}; "
                                f"point {POINTER} at a complete version") from None
        return Version(name, url, info, self.store)

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

    def publish(self, checkpoint_url: str, info: dict, lease: "Lease", files: dict[str, bytes] | None = None) -> Version:
        """Copy a checkpoint's weights and ``files`` (name: content) into a new immutable version,
        then move the pointer to it."""
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
            self._move_pointer(name, lease)
        self._guard("publish a model version", write)
        return Version(name, join(self.url, "versions", name), info, self.store)

    def _create_version_file(self, name: str, path: str, data: bytes) -> None:
        try:
            _create(self.fs, path, data)
        except FileExistsError:
            if not self._holds(path, data):
                raise RegistryBusy(f"{self.url}/versions/{name} appeared while this job wrote it: another writer "
                                   f"ignores the lease; nothing was published") from None

    def _move_pointer(self, name: str, lease: "Lease") -> None:
        """Point published.json at ``name``, unless it changed since it was read here or names a newer lease."""
        current, tag = self._read_pointer()
        self._refuse_newer(current, lease)
        lease.check()  # the only check in publish(): the pointer moves only while this writer holds the lease
        path = f"{self.path}/{POINTER}"
        body = json.dumps({"version": name, "fence": lease.number, "owner": lease.owner,
                           "published_at": time.time()}).encode()
        if replace_if_match(self.fs, path, body, tag, self._lock) is None and not self._holds(path, body):
            raise RegistryBusy(f"{self.url}/{POINTER} changed while this job published {name}: another writer "
                               f"published meanwhile; the pointer was left as it is")

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

    def lease(self, seconds: float, max_hold_s: float = DEFAULT_MAX_HOLD_S) -> "Lease":
        return Lease(self, seconds, max_hold_s)

    def _check_conditional_writes(self) -> None:
        """Refuse a store that ignores conditional writes, before trusting it with the lease: create a
        probe twice (the second must fail), then replace it naming a wrong version (it must not)."""
        if self._writes_checked:
            return
        name = f"lease/.probe-{uuid.uuid4().hex}"
        probe = f"{self.path}/{name}"

        def test() -> str | None:
            _create(self.fs, probe, b"probe", self._lock)
            try:
                _create(self.fs, probe, b"again", self._lock)
                return f"a second create-only write of {self.url}/{name} succeeded"
            except FileExistsError:
                pass
            if replace_if_match(self.fs, probe, b"again", '"0-not-its-etag"', self._lock) is not None:
                return f"a write to {self.url}/{name} conditional on a wrong version succeeded"
            return None

        try:
            ignored = self._guard("check that the model registry's store honours conditional writes", test)
        finally:
            try:
                self.fs.rm(probe)
            except FileNotFoundError:
                pass  # the first create failed
            except Exception as exc:  # noqa: BLE001 - a stray probe is harmless (not a lease number)
                log.warning("could not remove the registry's write probe: %s", describe_error(self.url, exc))
        if not (ignored or is_local(self.fs) or is_s3(self.fs) or self._is_gcs()):
            log.warning("%s: on %s a create-only write is fsspec's check-then-write, not exclusive: two retrains "
                        "started together could both take the lease", self.url, self._backend())
        if ignored:
            raise RegistryError(f"{self.url}: {self._backend()} ignores conditional writes ({ignored}), so two "
                                f"retrains could both take the lease and both publish; use a store that honours "
                                f"If-None-Match and If-Match (AWS S3, a current MinIO) or a local disk")
        self._writes_checked = True

    def _backend(self) -> str:
        if is_local(self.fs):
            return "the local file system"
        if is_s3(self.fs):
            endpoint = getattr(self.store, "endpoint_url", None)
            return f"the S3-compatible endpoint {endpoint}" if endpoint else "S3"
        if self._is_gcs():
            return "Google Cloud Storage"
        return f"the {self.url.split('://', 1)[0]} store"

    def _is_gcs(self) -> bool:
        return "gs" in self.fs.protocol or "gcs" in self.fs.protocol


class Lease:
    """Exclusive right to write a registry, renewed in the background until released.

    Use as a context manager; entering raises RegistryBusy when another live writer holds it.
    A writer that dies stops renewing, and its lease expires after ``seconds``; a writer that
    lives but is stuck stops renewing after ``max_hold_s``, and check() fails from then on.
    """

    def __init__(self, registry: ModelRegistry, seconds: float, max_hold_s: float = DEFAULT_MAX_HOLD_S):
        self.registry, self.seconds, self.max_hold_s = registry, seconds, max_hold_s
        self.fs, self.dir = registry.fs, f"{registry.path}/lease"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.number: int | None = None
        self._tag: str | None = None  # the version of our record that we last wrote: renewals compare with it
        self._since = 0.0  # time.monotonic() when the lease was taken, for max_hold_s
        self._acquired = 0.0  # the same, as a timestamp, for the record
        self._released = False
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None

    def _path(self, number: int) -> str:
        return f"{self.dir}/{number:06d}.json"

    def _url(self, number: int) -> str:
        return f"{self.registry.url}/lease/{number:06d}.json"

    def _numbers(self) -> list[int]:
        self.fs.invalidate_cache()
        try:
            # On S3 the directory is only its objects' common prefix: it vanishes when another
            # writer's start-up probe (the only object in it) is removed between exists() and ls().
            listing = self.fs.ls(self.dir, detail=False) if self.fs.exists(self.dir) else []
        except FileNotFoundError:
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in listing)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _body(self, expires: float, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "expires": expires, "released": released,
                           "acquired": self._acquired}).encode()

    def _read(self, number: int) -> tuple[dict | None, str, float | None]:
        """(record, or None if it is not a valid record; its tag; its modification time)."""
        data, tag, modified = read_tagged(self.fs, self._path(number))
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None, tag, modified
        valid = isinstance(record, dict) and isinstance(record.get("expires"), (int, float))
        return (record if valid else None), tag, modified

    def _live_holder(self, number: int) -> dict | None:
        """The lease record if it is live (unexpired, unreleased), else None."""
        try:
            record, _, modified = self._read(number)
        except FileNotFoundError:
            return None
        if record is None:
            # Torn or empty: its creator may be writing it right now, or died doing so.  Either way
            # it counts as live for one lease length from when it was last written, then expires.
            record = {"owner": "an unreadable record (a writer starting up, or one that died)",
                      "expires": (modified or 0.0) + self.seconds}
        return None if record.get("released") or record["expires"] < time.time() else record

    def acquire(self) -> None:
        self.registry._check_conditional_writes()
        self.registry._guard("take the model registry's lease", self._take)
        self.registry._held = self
        self._thread = threading.Thread(target=self._renew, daemon=True, name="charnn-lease")
        self._thread.start()

    def _take(self) -> None:
        numbers = self._numbers()
        latest = numbers[-1] if numbers else 0
        holder = self._live_holder(latest) if latest else None
        if holder:
            raise RegistryBusy(self._busy_message(latest, holder))
        # After the newest record and after the pointer's fence: numbers never go back, even if
        # lease/ was deleted, so a new holder's fence is above every published one.
        number = max(latest, self.registry._fence()) + 1
        self._since, self._acquired = time.monotonic(), time.time()
        self._tag = self._create_record(number)
        self.number = number
        self._prune(numbers[:-1])  # keep the newest two records for post-mortems

    def _create_record(self, number: int) -> str:
        try:
            tag = _create(self.fs, self._path(number), self._body(time.time() + self.seconds), self.registry._lock)
        except FileExistsError:
            tag = None  # S3 may have stored our first attempt and refused the retry: then it is ours
        if tag is None:
            tag = self._own_tag(number)
        if tag is None:
            raise RegistryBusy(f"another retrain of {self.registry.url} took its lease just now; "
                               f"this one stops without writing")
        return tag

    def _own_tag(self, number: int) -> str | None:
        """The tag of record ``number`` if it is still this writer's and unreleased, else None."""
        try:
            record, tag, _ = self._read(number)
        except FileNotFoundError:
            return None
        return tag if record and record.get("owner") == self.owner and not record.get("released") else None

    def _prune(self, numbers: list[int]) -> None:
        """Delete old records; the new lease exists already, so a failure here costs nothing."""
        for old in numbers:
            try:
                self.fs.rm(self._path(old))
            except FileNotFoundError:
                pass  # another writer pruned it
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove the old lease record %s: %s", self._url(old),
                            describe_error(self.registry.url, exc))

    def _busy_message(self, number: int, holder: dict) -> str:
        left = max(0, holder["expires"] - time.time())
        return (f"another retrain holds the lease of {self.registry.url} ({holder['owner']}, "
                f"for {left:.0f} s more unless renewed); this one stops without writing. If that job is dead, "
                f"wait for its lease to expire; to free it sooner, make sure that job is stopped, then set "
                f"\"released\": true in {self._url(number)} (keep the lease records: their numbers fence "
                f"the writers)")

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self._renew_once():
                    return
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; check() reports expiry
                log.warning("could not renew the registry lease: %s", describe_error(self.registry.url, exc))

    def _renew_once(self) -> bool:
        """Extend our record if it is still ours; False, and the lease is lost, once it is not."""
        overdue = self._overdue()
        if overdue:
            return self._lose(overdue)
        tag = self._replace(self._body(time.time() + self.seconds))
        if tag is None:
            # Changed since our last write.  Still ours only if S3 stored an earlier attempt of
            # ours whose reply was lost: then take its tag and try once more.
            self._tag = self._own_tag(self.number)
            tag = self._tag and self._replace(self._body(time.time() + self.seconds))
        if tag is None:
            return self._lose("its record was replaced or removed by another writer")
        self._tag = tag
        return True

    def _replace(self, body: bytes) -> str | None:
        """Write our record if it is still the version we last wrote; its new tag, or None."""
        if self._tag is None:  # never "create if absent": a record that vanished stays gone
            return None
        return replace_if_match(self.fs, self._path(self.number), body, self._tag, self.registry._lock)

    def _overdue(self) -> str | None:
        if self.number is not None and time.monotonic() - self._since > self.max_hold_s:
            return f"held for more than max_hold_s={self.max_hold_s:g} s, so it is no longer renewed"
        return None

    def _lose(self, reason: str) -> bool:
        if not self._lost:
            self._lost = reason
            log.warning("lost the lease of %s: %s", self.registry.url, reason)
        return False

    def check(self) -> None:
        """Raise RegistryBusy unless this writer still holds a live lease."""
        reason = self._lost or self._overdue() or self.registry._guard("check the registry lease", self._not_held)
        if reason:
            raise RegistryBusy(f"lost the lease of {self.registry.url} ({reason}); nothing was published")

    def _not_held(self) -> str | None:
        """Why this writer does not hold the lease now, or None if it does."""
        if self.number is None:
            return "it was never taken"
        if self._released:
            return "this job released it"
        numbers = self._numbers()
        if not numbers or numbers[-1] != self.number:
            return "a newer lease exists"
        try:
            record, _, _ = self._read(self.number)
        except FileNotFoundError:
            return "its record was removed"
        if record is None or record.get("owner") != self.owner:
            return "another writer took it over"
        if record.get("released"):
            return "it was released"
        if record["expires"] < time.time():
            return "expired"
        return None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)  # a renewal in flight would otherwise race the release below
        if self.registry._held is self:
            self.registry._held = None
        if self.number is not None and not self._lost and not self._released:
            self._released = True
            try:
                if self._replace(self._body(0.0, released=True)) is None:
                    log.warning("did not release the lease of %s: its record is no longer this job's",
                                self.registry.url)
            except Exception as exc:  # noqa: BLE001 - an unreleased lease just expires
                log.warning("could not release the registry lease: %s", describe_error(self.registry.url, exc))

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
