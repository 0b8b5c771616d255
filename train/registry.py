"""The model registry: immutable versions, one published pointer, and a lease for writers.

Layout under ``<run.storage>/models/<name>/``::

    versions/v0001/model.pt        the weights, shape, alphabet, spec and dataset (a checkpoint's model.pt)
    versions/v0001/version.json    metrics, dataset sources, provenance; written last
    published.json                 {"version": "v0001", ...}: replaced in one write
    rejected/<candidate>.json      candidates that did not beat the published model
    lease/000001.json              who may write, until when

A version is written completely, each file with a create-only write, before the pointer
moves; so a writer killed at any point leaves the published model untouched.  Writers
take the lease first.  A lease is a numbered object created with a create-only write
(S3 ``If-None-Match: *``, ``O_EXCL`` locally): of two writers racing for number n, one wins.
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

from pipeline.storage import StorageError, describe_error, join, open_url, write_bytes_atomic
from train.checkpoint import MODEL_FILE

POINTER = "published.json"
VERSION_FILE = "version.json"

log = logging.getLogger("charnn.registry")


class RegistryError(RuntimeError):
    """A registry that cannot be read or written; the message names the object and the fix."""


class RegistryBusy(RuntimeError):
    """Another writer holds the model's lease."""


@dataclass(frozen=True)
class Version:
    name: str  # v0001
    url: str  # the version directory: a loadable checkpoint (model.pt)
    info: dict  # version.json

    @property
    def sources(self) -> dict[str, str]:
        """{document URL: content identity} of the dataset the version was trained on."""
        return {s["url"]: s["identity"] for s in self.info["dataset"]["sources"]}


def _read_json(fs, path: str, what: str) -> dict:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{what} {path} is not valid JSON ({exc}); restore it or delete it") from None


def _create(fs, path: str, data: bytes) -> None:
    """Write ``path`` only if it does not exist yet (FileExistsError otherwise)."""
    if "file" in fs.protocol or "local" in fs.protocol:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data, mode="create")


class ModelRegistry:
    def __init__(self, url: str, storage: Any = None):
        self.url = url.rstrip("/")
        self.storage = storage
        try:
            self.fs, self.path = open_url(self.url, storage)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot open model registry {describe_error(self.url, exc)}") from None

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
        return Version(name, url, info)

    def versions(self) -> list[str]:
        def names():
            self.fs.invalidate_cache()
            directory = f"{self.path}/versions"
            if not self.fs.exists(directory):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False))
        return self._guard("list model versions", names)

    def publish(self, checkpoint_url: str, info: dict, lease: "Lease") -> Version:
        """Copy a checkpoint's weights into a new immutable version, then move the pointer to it."""
        existing = [int(n[1:]) for n in self.versions() if n.startswith("v") and n[1:].isdigit()]
        name = f"v{max(existing, default=0) + 1:04d}"
        src_fs, src_path = open_url(join(checkpoint_url, MODEL_FILE), self.storage)
        info = {**info, "version": name, "published_at": time.time()}

        def write():
            base = f"{self.path}/versions/{name}"
            try:
                _create(self.fs, f"{base}/{MODEL_FILE}", src_fs.cat_file(src_path))
                _create(self.fs, f"{base}/{VERSION_FILE}", json.dumps(info, indent=1).encode())
            except FileExistsError:
                raise RegistryBusy(f"{self.url}/versions/{name} appeared while this job wrote it: another writer "
                                   f"ignores the lease; nothing was published") from None
            lease.check()  # the pointer moves only while this writer still holds the lease
            write_bytes_atomic(self.fs, f"{self.path}/{POINTER}", json.dumps({"version": name}).encode())
        self._guard("publish a model version", write)
        return Version(name, join(self.url, "versions", name), info)

    def reject(self, candidate: str, info: dict) -> str:
        url = join(self.url, "rejected", f"{candidate}.json")
        self._guard("record a rejected candidate",
                    lambda: write_bytes_atomic(self.fs, f"{self.path}/rejected/{candidate}.json",
                                               json.dumps(info, indent=1).encode()))
        return url

    def lease(self, seconds: float) -> "Lease":
        return Lease(self, seconds)


class Lease:
    """Exclusive right to write a registry, renewed in the background until released.

    Use as a context manager; entering raises RegistryBusy when another live writer holds it.
    A writer that dies stops renewing, and its lease expires after ``seconds``.
    """

    def __init__(self, registry: ModelRegistry, seconds: float):
        self.registry, self.seconds = registry, seconds
        self.fs, self.dir = registry.fs, f"{registry.path}/lease"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.number: int | None = None
        self._stop = threading.Event()
        self._lost: str | None = None

    def _path(self, number: int) -> str:
        return f"{self.dir}/{number:06d}.json"

    def _numbers(self) -> list[int]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.dir):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.dir, detail=False))
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _body(self, expires: float, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "expires": expires, "released": released}).encode()

    def _holder(self, number: int) -> dict | None:
        """The lease record if it is live (unexpired, unreleased), else None."""
        try:
            record = json.loads(self.fs.cat_file(self._path(number)))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # being written by its creator right now
            return {"owner": "a writer starting up", "expires": time.time() + self.seconds}
        return None if record.get("released") or record.get("expires", 0) < time.time() else record

    def acquire(self) -> None:
        def take():
            numbers = self._numbers()
            latest = numbers[-1] if numbers else 0
            holder = self._holder(latest) if latest else None
            if holder:
                raise RegistryBusy(self._busy_message(holder))
            try:
                _create(self.fs, self._path(latest + 1), self._body(time.time() + self.seconds))
            except FileExistsError:
                raise RegistryBusy(f"another retrain of {self.registry.url} took its lease just now; "
                                   f"this one stops without writing") from None
            self.number = latest + 1
            for old in numbers[:-1]:  # keep the last two records for post-mortems
                self.fs.rm(self._path(old))
        self.registry._guard("take the model registry's lease", take)
        threading.Thread(target=self._renew, daemon=True, name="charnn-lease").start()

    def _busy_message(self, holder: dict) -> str:
        left = max(0, holder["expires"] - time.time())
        return (f"another retrain holds the lease of {self.registry.url} ({holder['owner']}, "
                f"for {left:.0f} s more unless renewed); this one stops without writing. If that job is dead, "
                f"wait for the lease to expire or delete {self.registry.url}/lease")

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if self._numbers()[-1] != self.number:
                    self._lost = "a newer lease exists"
                    return
                self.fs.pipe_file(self._path(self.number), self._body(time.time() + self.seconds))
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; check() reports expiry
                log.warning("could not renew the registry lease: %s", describe_error(self.registry.url, exc))

    def check(self) -> None:
        """Raise RegistryBusy unless this writer still holds a live lease."""
        numbers = self._numbers()
        holder = self._holder(self.number) if self.number else None
        if self._lost or not numbers or numbers[-1] != self.number or not holder or holder["owner"] != self.owner:
            raise RegistryBusy(f"lost the lease of {self.registry.url} ({self._lost or 'expired'}); "
                               f"nothing was published")

    def release(self) -> None:
        self._stop.set()
        if self.number is not None and not self._lost:
            try:
                self.fs.pipe_file(self._path(self.number), self._body(0.0, released=True))
            except Exception as exc:  # noqa: BLE001 - an unreleased lease just expires
                log.warning("could not release the registry lease: %s", describe_error(self.registry.url, exc))
            self.number = None

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
