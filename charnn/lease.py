"""A lease: the exclusive right to write a directory in shared storage, renewed in the background.

The model registry's writers (one retrain of a model at a time) and a run's driver (one job per
run directory at a time) take one.  A lease is a numbered record under ``<directory>/lease/``,
created with a create-only write, so of two writers racing for number n exactly one wins.  The
next number comes after both the newest record and the directory's fence (the registry's
published pointer), so numbers never go back below a published fence even if ``lease/`` is
deleted (with nothing published since, the deleted records' numbers are taken again: harmless,
since a holder whose record is gone or replaced has lost the lease).  The holder renews its
record with a compare-and-swap (only while the record is still the one it wrote) and stops,
having lost the lease, the moment it is not; it also stops after ``max_hold_s``.  A writer that
dies stops renewing, and its lease expires.  Before trusting a store with a lease, the holder
checks once that the store really refuses a second create and a stale compare-and-swap.

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
  in turn either way): keep a directory shared by several hosts on NFSv4 with locking, or on S3.
- AWS S3: create is PutObject with ``If-None-Match: *`` (on CompleteMultipartUpload for files
  over 100 MB); compare-and-swap is PutObject with ``If-Match: <ETag>``.  Both are atomic on
  the server.  A 409 ConditionalRequestConflict (two conditional writes at once) and a 412
  without its Condition element are a lost race (busy).  A create whose reply was lost
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

import enum
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from charnn.errors import Busy, CharnnError, UserError
from charnn.storage import (StorageError, Store, create_exclusive, describe_error, is_local, is_s3, join, read_tagged,
                            replace_if_match)

DEFAULT_MAX_HOLD_S = 6 * 3600.0  # longer than any retrain should take; shorter than the nightly schedule
LOCK_FILE = ".lock"
LEASE_FORMAT = 1  # the newest lease record format this code reads and writes

log = logging.getLogger("charnn.lease")


class LeaseBusy(Busy):
    """Another writer holds the lease; exit 75."""


class LeaseError(UserError):
    """A leased directory whose store cannot be trusted with a lease."""


def this_process() -> dict:
    """What identifies this process on this machine, for ``has_ended``: the kernel's boot id and pid
    namespace (Linux; empty elsewhere) and the pid."""
    def read(how) -> str:
        try:
            return how()
        except OSError:
            return ""
    return {"boot": read(lambda: open("/proc/sys/kernel/random/boot_id").read().strip()),
            "pidns": read(lambda: os.readlink("/proc/self/ns/pid")), "pid": os.getpid()}


def has_ended(process) -> bool:
    """Whether the process a lease record names has certainly ended: it ran on this machine since
    this boot, in this pid namespace (another container's pid 123 is not ours), and its pid is gone.
    A reused pid only makes a dead holder look alive, which is safe."""
    if not isinstance(process, dict) or not isinstance(process.get("pid"), int):
        return False
    here = this_process()
    same_machine = (here["boot"] and here["pidns"]
                    and (process.get("boot"), process.get("pidns")) == (here["boot"], here["pidns"]))
    return bool(same_machine) and not os.path.exists(f"/proc/{process['pid']}")


@dataclass(frozen=True)
class LeaseRecord:
    """One record under ``lease/``: who holds the lease, until when.  Format 1 is the record as
    written before records had a format, key for key, and carries no "format" key, so holders of
    either age read each other's records; records from before "acquired" and "process" lack them."""

    owner: str
    expires: float  # a time.time(): the lease is free after it unless renewed
    released: bool = False
    acquired: float | None = None  # when the holder took it: retention keeps what it may have read since
    process: dict | None = None  # this_process() of the holder, for has_ended
    format: int = LEASE_FORMAT

    def to_json(self) -> bytes:
        record: dict[str, Any] = {"owner": self.owner, "expires": self.expires, "released": self.released}
        if self.acquired is not None:
            record["acquired"] = self.acquired
        if self.process is not None:
            record["process"] = self.process
        if self.format != 1:
            record["format"] = self.format
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LeaseRecord | None":
        """The record in ``data``, or None when it is torn, not a record, or of a newer format than
        this code knows: the callers then count it as live until it expires by its modification time."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("expires"), (int, float)):
            return None
        version = raw.get("format", 1)
        if not isinstance(version, int) or version > LEASE_FORMAT:
            return None
        owner, acquired, process = raw.get("owner"), raw.get("acquired"), raw.get("process")
        return cls(owner if isinstance(owner, str) else "", raw["expires"], bool(raw.get("released")),
                   acquired if isinstance(acquired, (int, float)) else None,
                   process if isinstance(process, dict) else None, version)

    def ended(self, now: float) -> bool:
        """Released or expired: the next writer may take the lease."""
        return self.released or self.expires < now


class LeaseState(enum.Enum):
    """A Lease object's life: NEW until taken, HELD while renewed, then LOST (its record stopped being
    this writer's, or max_hold_s passed) or RELEASED; both are final, and check() fails in either."""

    NEW = "new"
    HELD = "held"
    LOST = "lost"
    RELEASED = "released"


class Renewal:
    """The thread that renews a held lease every ``every_s`` until ``renew_once`` says it is lost or
    ``stop`` is set; a renewal that fails is retried next time (check() reports an expiry)."""

    def __init__(self, renew_once: Callable[[], bool], every_s: float, url: str, stop: threading.Event):
        self.renew_once, self.every_s, self.url, self._stop = renew_once, every_s, url, stop
        self._thread = threading.Thread(target=self._run, daemon=True, name="charnn-lease")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.renew_once():
                    return
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; check() reports expiry
                log.warning("could not renew the lease: %s", describe_error(self.url, exc))

    def stop(self, wait_s: float = 30.0) -> None:
        """Stop, waiting for a renewal in flight: it would otherwise race the holder's release."""
        self._stop.set()
        self._thread.join(wait_s)


class LeasedDirectory:
    """A directory in any store whose writers take a lease; subclasses name their writers and errors."""

    Busy: type[Busy] = LeaseBusy
    Error: type[UserError] = LeaseError
    writer = "writer"  # who holds the lease, for messages: "another <writer> holds the lease of ..."

    def __init__(self, url: str, store: Store):
        self.url = url.rstrip("/")
        self.store = store
        try:
            # The conditional writes below the Store take (filesystem, path): the lease's records and
            # the registry's pointer are written through them.
            self.fs, self.path = store.fs(self.url)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot open {describe_error(self.url, exc)}") from None
        self._writes_checked = False  # the self-test of conditional writes, once per object

    @property
    def _lock(self) -> str | None:
        """The lock file of local compare-and-swaps (object stores compare on the server)."""
        return f"{self.path}/{LOCK_FILE}" if is_local(self.fs) else None

    def _guard(self, what: str, action):
        """``action()``, any backend failure turned into one line (a missing object included: the
        callers that expect one catch it inside ``action``)."""
        try:
            return action()
        except (CharnnError, FileExistsError):  # already one line (LockBusy, Busy, ...)
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
            raise StorageError(f"cannot {what} {describe_error(self.url, exc)}") from None

    def _fence(self) -> int:
        """The newest lease number that wrote something lasting (0: none); new leases come after it."""
        return 0

    def lease(self, seconds: float, max_hold_s: float = DEFAULT_MAX_HOLD_S) -> "Lease":
        return Lease(self, seconds, max_hold_s)

    def lease_numbers(self) -> list[int]:
        """The numbers of the lease records there are, in order (the newest is the current or last holder's)."""
        try:
            names = self.store.names(join(self.url, "lease"))
        except FileNotFoundError:
            # On S3 the directory is only its objects' common prefix: it vanishes when another
            # writer's start-up probe (the only object in it) is removed between exists() and ls().
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def record_path(self, number: int) -> str:
        return f"{self.path}/lease/{number:06d}.json"

    def record_url(self, number: int) -> str:
        return f"{self.url}/lease/{number:06d}.json"

    def read_record(self, number: int) -> tuple[LeaseRecord | None, str, float | None]:
        """(lease record ``number``, or None if it is not a valid one; its tag; its modification time);
        FileNotFoundError if there is none."""
        data, tag, modified = read_tagged(self.fs, self.record_path(number))
        return LeaseRecord.from_json(data), tag, modified

    def _check_conditional_writes(self) -> None:
        """Refuse a store that ignores conditional writes, before trusting it with the lease: create a
        probe twice (the second must fail), then replace it naming a wrong version (it must not)."""
        if self._writes_checked:
            return
        name = f"lease/.probe-{uuid.uuid4().hex}"
        probe = f"{self.path}/{name}"

        def test() -> str | None:
            create_exclusive(self.fs, probe, b"probe", self._lock)
            try:
                create_exclusive(self.fs, probe, b"again", self._lock)
                return f"a second create-only write of {self.url}/{name} succeeded"
            except FileExistsError:
                pass
            if replace_if_match(self.fs, probe, b"again", '"0-not-its-etag"', self._lock) is not None:
                return f"a write to {self.url}/{name} conditional on a wrong version succeeded"
            return None

        try:
            ignored = self._guard("check that the store honours conditional writes at", test)
        finally:
            try:
                self.fs.rm(probe)
            except FileNotFoundError:
                pass  # the first create failed
            except Exception as exc:  # noqa: BLE001 - a stray probe is harmless (not a lease number)
                log.warning("could not remove the lease's write probe: %s", describe_error(self.url, exc))
        if not (ignored or is_local(self.fs) or is_s3(self.fs) or self._is_gcs()):
            log.warning("%s: on %s a create-only write is fsspec's check-then-write, not exclusive: two retrains "
                        "started together could both take the lease", self.url, self._backend())
        if ignored:
            raise self.Error(f"{self.url}: {self._backend()} ignores conditional writes ({ignored}), so two "
                             f"writers could both take the lease and both write; use a store that honours "
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
    """Exclusive right to write a directory, renewed in the background until released.

    Use as a context manager; entering raises the directory's Busy when another live writer holds it.
    A writer that dies stops renewing, and its lease expires after ``seconds``; a writer that
    lives but is stuck stops renewing after ``max_hold_s``, and check() fails from then on.
    """

    def __init__(self, directory: "LeasedDirectory", seconds: float, max_hold_s: float = DEFAULT_MAX_HOLD_S):
        self.directory, self.seconds, self.max_hold_s = directory, seconds, max_hold_s
        self.fs = directory.fs
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.number: int | None = None
        self.state = LeaseState.NEW
        self.lost_reason: str | None = None  # why, once LOST
        self._record: LeaseRecord | None = None  # what this holder writes, its expiry aside
        self._tag: str | None = None  # the version of our record that we last wrote: renewals compare with it
        self._since = 0.0  # time.monotonic() when the lease was taken, for max_hold_s
        self._stop = threading.Event()  # ends the renewals (set directly: a writer that died, in tests)
        self._renewal: Renewal | None = None

    def _numbers(self) -> list[int]:
        return self.directory.lease_numbers()

    def _body(self, expires: float, released: bool = False) -> bytes:
        return replace(self._record, expires=expires, released=released).to_json()

    def _read(self, number: int) -> tuple[LeaseRecord | None, str, float | None]:
        return self.directory.read_record(number)

    def _live_holder(self, number: int) -> LeaseRecord | None:
        """The lease record if it is live (unexpired, unreleased), else None."""
        try:
            record, _, modified = self._read(number)
        except FileNotFoundError:
            return None
        if record is None:
            # Torn or empty: its creator may be writing it right now, or died doing so.  Either way
            # it counts as live for one lease length from when it was last written, then expires.
            record = LeaseRecord("an unreadable record (a writer starting up, or one that died)",
                                 (modified or 0.0) + self.seconds)
        if record.ended(time.time()):
            return None
        if has_ended(record.process):  # killed outright on this machine: no need to wait for expiry
            log.info("the holder of %s (%s) is no longer running; its lease is taken over",
                     self.directory.record_url(number), record.owner)
            return None
        return record

    def acquire(self) -> None:
        self.directory._check_conditional_writes()
        self.directory._guard("take the lease of", self._take)
        self.state = LeaseState.HELD
        self._renewal = Renewal(self._renew_once, self.seconds / 3, self.directory.url, self._stop)

    def _take(self) -> None:
        numbers = self._numbers()
        latest = numbers[-1] if numbers else 0
        holder = self._live_holder(latest) if latest else None
        if holder:
            raise self.directory.Busy(self._busy_message(latest, holder))
        # After the newest record and after the pointer's fence: numbers never go back, even if
        # lease/ was deleted, so a new holder's fence is above every published one.
        number = max(latest, self.directory._fence()) + 1
        self._since = time.monotonic()
        self._record = LeaseRecord(self.owner, 0.0, acquired=time.time(), process=this_process())
        self._tag = self._create_record(number)
        self.number = number
        self._prune(numbers[:-1])  # keep the newest two records for post-mortems

    def _create_record(self, number: int) -> str:
        directory = self.directory
        try:
            tag = create_exclusive(self.fs, directory.record_path(number), self._body(time.time() + self.seconds),
                                   directory._lock)
        except FileExistsError:
            tag = None  # S3 may have stored our first attempt and refused the retry: then it is ours
        if tag is None:
            tag = self._own_tag(number)
        if tag is None:
            raise directory.Busy(f"another {directory.writer} of {directory.url} took its lease just now; "
                                 f"this one stops without writing")
        return tag

    def _own_tag(self, number: int) -> str | None:
        """The tag of record ``number`` if it is still this writer's and unreleased, else None."""
        try:
            record, tag, _ = self._read(number)
        except FileNotFoundError:
            return None
        return tag if record and record.owner == self.owner and not record.released else None

    def _prune(self, numbers: list[int]) -> None:
        """Delete old records; the new lease exists already, so a failure here costs nothing."""
        for old in numbers:
            try:
                self.fs.rm(self.directory.record_path(old))
            except FileNotFoundError:
                pass  # another writer pruned it
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove the old lease record %s: %s", self.directory.record_url(old),
                            describe_error(self.directory.url, exc))

    def _busy_message(self, number: int, holder: LeaseRecord) -> str:
        left = max(0, holder.expires - time.time())
        return (f"another {self.directory.writer} holds the lease of {self.directory.url} ({holder.owner}, "
                f"for {left:.0f} s more unless renewed); this one stops without writing. If that job is dead, "
                f"wait for its lease to expire; to free it sooner, make sure that job is stopped, then set "
                f"\"released\": true in {self.directory.record_url(number)} (keep the lease records: their "
                f"numbers fence the writers)")

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
        return replace_if_match(self.fs, self.directory.record_path(self.number), body, self._tag,
                                self.directory._lock)

    def _overdue(self) -> str | None:
        if self.number is not None and time.monotonic() - self._since > self.max_hold_s:
            return f"held for more than max_hold_s={self.max_hold_s:g} s, so it is no longer renewed"
        return None

    def _lose(self, reason: str) -> bool:
        if self.state is LeaseState.HELD:
            self.state, self.lost_reason = LeaseState.LOST, reason
            log.warning("lost the lease of %s: %s", self.directory.url, reason)
        return False

    def check(self) -> None:
        """Raise the directory's Busy unless this writer still holds a live lease."""
        reason = self.lost_reason or self._overdue() or self.directory._guard("check the lease of", self._not_held)
        if reason:
            raise self.directory.Busy(f"lost the lease of {self.directory.url} ({reason}); nothing was published")

    def _not_held(self) -> str | None:
        """Why this writer does not hold the lease now, or None if it does."""
        if self.state is LeaseState.NEW:
            return "it was never taken"
        if self.state is LeaseState.RELEASED:
            return "this job released it"
        numbers = self._numbers()
        if not numbers or numbers[-1] != self.number:
            return "a newer lease exists"
        try:
            record, _, _ = self._read(self.number)
        except FileNotFoundError:
            return "its record was removed"
        if record is None or record.owner != self.owner:
            return "another writer took it over"
        if record.released:
            return "it was released"
        if record.expires < time.time():
            return "expired"
        return None

    def release(self) -> None:
        if self._renewal is not None:
            self._renewal.stop()  # a renewal in flight would otherwise race the release below
        if self.state is not LeaseState.HELD:
            return
        self.state = LeaseState.RELEASED
        try:
            if self._replace(self._body(0.0, released=True)) is None:
                log.warning("did not release the lease of %s: its record is no longer this job's", self.directory.url)
        except Exception as exc:  # noqa: BLE001 - an unreleased lease just expires
            log.warning("could not release the lease: %s", describe_error(self.directory.url, exc))

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
