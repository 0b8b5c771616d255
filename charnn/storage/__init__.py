"""How charnn reaches storage: a ``Store``, made once from the spec's ``storage`` section.

A Store turns a URL (a local path, s3://, gs://, any fsspec URL) into a filesystem for fsspec,
or for pyarrow where Ray Train wants one; it carries the S3 endpoint override (MinIO, moto)
and how patiently S3 requests are retried.  Credentials never live here: they come from the
environment, as boto expects.  Below the Store: the writes the rest of charnn relies on
(atomic, exclusive, compare-and-swap).  Beside it: ``run`` (``RunStorage``, a run's named
paths) and ``s3`` (what s3fs's public API lacks).  Credentials are masked by ``charnn.redact``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
import fsspec.asyn

from charnn.errors import Busy, UserError
from charnn.storage import s3
from charnn.redact import redact, redact_urls  # noqa: F401 - the names callers import from here

GLOB_CHARS = "*?["  # a URL holding any of these is a pattern

# Attempts per S3 request when the spec says nothing: standard mode backs off exponentially
# (up to 20 s), so an endpoint that is away for tens of seconds costs a pause, not the run.
S3_ATTEMPTS = 10


class StorageError(UserError):
    """A URL that cannot be reached, listed or written."""


@dataclass(frozen=True)
class Store:
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    max_attempts: int = S3_ATTEMPTS

    @classmethod
    def of(cls, config: Any = None) -> "Store":
        """The Store for a spec's ``storage`` section (or a Store, or None: the defaults)."""
        if isinstance(config, Store):
            return config
        if config is None:
            return cls()
        return cls(config.endpoint_url, config.region, config.anon, config.max_attempts or S3_ATTEMPTS)

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path) for ``url``; ``~`` is expanded for local paths.  For pyarrow and Ray,
        which take a filesystem, and for this package's backend-specific code: every other use
        has a method below, so that nothing outside ``charnn.storage`` depends on fsspec."""
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        return fsspec.core.url_to_fs(url, **self._fsspec_options(url))

    def _fsspec_options(self, url: str) -> dict:
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme in ("s3", "s3a"):
            options: dict = {"config_kwargs": {"connect_timeout": 5,
                                               "retries": {"max_attempts": self.max_attempts, "mode": "standard"}}}
            if self.endpoint_url:
                options["endpoint_url"] = self.endpoint_url
            if self.region:
                options["client_kwargs"] = {"region_name": self.region}
            if self.anon:
                options["anon"] = True
            return options
        return {"token": "anon"} if scheme in ("gs", "gcs") and self.anon else {}

    def for_ray(self, url: str):
        """(storage_path, storage_filesystem) for Ray Train's RunConfig: S3 gets a pyarrow
        filesystem of its own, for the endpoint override and the same patient retries."""
        import pyarrow.fs

        if url.startswith(("s3://", "s3a://")):
            endpoint = self.endpoint_url
            options = {"endpoint_override": endpoint.split("://", 1)[-1], "region": "us-east-1",
                       "scheme": "https" if endpoint.startswith("https") else "http"} if endpoint else {}
            if self.region:
                options["region"] = self.region
            retries = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts)
            return url.split("://", 1)[1], pyarrow.fs.S3FileSystem(anonymous=self.anon, retry_strategy=retries,
                                                                    **options)
        return (os.path.abspath(os.path.expanduser(url)), None) if "://" not in url else (url, None)

    def read(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        fs, path = self.fs(url)
        return fs.cat_file(path, start=start, end=end)

    def exists(self, url: str) -> bool:
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        return fs.exists(path)

    def write(self, url: str, data: bytes, durable: bool = True) -> None:
        """``data`` at ``url``, seen whole or not at all (see ``open_atomic``)."""
        fs, path = self.fs(url)
        write_bytes_atomic(fs, path, data, durable)

    @contextlib.contextmanager
    def open_atomic(self, url: str, durable: bool = True) -> Iterator[Any]:
        fs, path = self.fs(url)
        with open_atomic(fs, path, durable) as f:
            yield f

    def names(self, url: str, directories: bool = False) -> list[str]:
        """The names in the directory ``url`` (its subdirectories', with ``directories``), sorted."""
        return self.list(url, dirs=directories)

    def list(self, url: str, dirs: bool | None = False, detail: bool = False) -> list:
        """The files in the directory ``url`` (``dirs``: its subdirectories; None: both), sorted by
        name: their names, or with ``detail`` their records (``name``: the path, ``type``, ``size``).
        Listed afresh, never from fsspec's cache: another job may have written since.  A directory
        that does not exist holds nothing."""
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        entries = sorted(fs.ls(path, detail=True), key=lambda e: basename(e["name"]))
        entries = [e for e in entries if dirs is None or (e["type"] == "directory") == dirs]
        return entries if detail else [basename(e["name"]) for e in entries]

    def find(self, url: str, dirs: bool = False) -> dict[str, dict]:
        """Every file under ``url`` (``dirs``: and directory), afresh: {path: record}; none under
        a directory that does not exist."""
        fs, path = self.fs(url)
        fs.invalidate_cache()
        return fs.find(path, withdirs=dirs, detail=True)

    def walk(self, url: str, add: Callable[[str, str, dict], None]) -> None:
        """``add(url, key, record)`` for every file of an object store that ``url`` names: the
        objects under a prefix (on S3 a page of 1,000 at a time), those a glob matches, or one
        object; ``key`` is its path below the listing's root.  Listed afresh: a listing cached by
        an earlier build would hide new files."""
        fs, path = self.fs(url)
        fs.invalidate_cache()
        scheme = protocol(fs)

        def found(p: str, info: dict) -> None:
            if info.get("type") == "file":
                add(p if scheme in ("file", "local") or "://" in p else f"{scheme}://{p}",  # HTTP: full URLs
                    posixpath.relpath(p, root), info)

        if any(c in path for c in GLOB_CHARS):
            root = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            entries = fs.glob(path, detail=True).items()
        elif fs.isdir(path):
            root = path
            if is_s3(fs):
                return s3.list_objects(fs, path, found)
            entries = fs.find(path, detail=True).items()
        else:
            root, entries = posixpath.dirname(path), [(path, fs.info(path))] if fs.exists(path) else []
        for p, info in entries:
            found(p, info)

    def local_path(self, url: str) -> str | None:
        """Where ``url`` is on this machine's disk (to memory-map it), or None in an object store."""
        fs, path = self.fs(url)
        return path if is_local(fs) else None

    def path(self, url: str) -> str:
        """``url`` as its filesystem names it (no scheme; local: absolute): what two URLs compare by."""
        return self.fs(url)[1]

    def open(self, url: str, mode: str = "rb", **options: Any) -> Any:
        """A file object on ``url``, for streamed reads (``options``: fsspec's, e.g. ``block_size``).
        Writes that readers must see whole go through ``write`` or ``open_atomic``."""
        fs, path = self.fs(url)
        return fs.open(path, mode, **options)

    def read_json(self, url: str) -> Any:
        return json.loads(self.read(url))

    def info(self, url: str, fresh: bool = False) -> dict:
        """The store's record of ``url`` (``size``, ``type``, and its version: ETag, mtime...);
        ``fresh``: asked of the store, not fsspec's cache."""
        fs, path = self.fs(url)
        if fresh:
            fs.invalidate_cache(path)
        return fs.info(path)

    def size(self, url: str) -> int:
        fs, path = self.fs(url)
        return fs.size(path)

    def remove(self, urls: str | list[str], recursive: bool = False) -> None:
        """Delete ``urls`` (one URL, or several of one store in as few requests as it allows)."""
        urls = [urls] if isinstance(urls, str) else urls
        if urls:
            fs = self.fs(urls[0])[0]
            fs.rm([self.path(u) for u in urls], recursive=recursive)

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (of the same store): a rename on a disk, a copy then a delete on S3."""
        fs, path = self.fs(src)
        fs.mv(path, self.path(dst))

    def put(self, local_dir: str, url: str) -> None:
        """Copy the local directory ``local_dir`` to the directory ``url``, file for file, into what is there."""
        fs, path = self.fs(url)
        fs.put(local_dir.rstrip("/") + "/", path, recursive=True)

    def create(self, url: str, data: bytes, lock: str | None = None) -> str | None:
        """``data`` at ``url`` only if nothing is there yet: see ``create_exclusive``."""
        fs, path = self.fs(url)
        return create_exclusive(fs, path, data, lock)

    def read_tagged(self, url: str) -> tuple[bytes, str, float | None]:
        """(content, tag, modification time) of ``url``, from one read: see ``read_tagged``."""
        fs, path = self.fs(url)
        return read_tagged(fs, path)

    def replace_if_match(self, url: str, data: bytes, tag: str | None, lock: str | None = None) -> str | None:
        """``data`` at ``url`` only if it is still the version ``tag``: see ``replace_if_match``."""
        fs, path = self.fs(url)
        return replace_if_match(fs, path, data, tag, lock)

    @contextlib.contextmanager
    def local_dir(self, url: str) -> Iterator[str]:
        """A local directory holding the (flat) directory at ``url``: itself, or a copy."""
        fs, path = self.fs(url)
        if is_local(fs):
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="charnn-copy-") as local:
            for remote in fs.ls(path, detail=False):
                with open(os.path.join(local, basename(remote)), "wb") as f:
                    f.write(fs.cat_file(remote))
            yield local


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str, durable: bool = True) -> Iterator[Any]:
    """A file to write at ``path`` that readers see whole or not at all.

    Locally it is written under a temporary name and renamed into place (``durable``: synced
    to disk before the rename, and its directory after).  An object store makes an object
    visible when its upload completes, which happens only when the block ends without an
    exception: on one, the upload is thrown away (an S3 multipart upload is aborted) and nothing
    appears under ``path``, since a reader that lists a directory (the document cache's
    index) would take a torn object for a whole one."""
    if is_local(fs):
        with _local_atomic(path, durable) as f:
            yield f
        return
    f = fs.open(path, "wb")
    try:
        yield f
        f.close()  # the upload completes here
    except BaseException:
        _abandon_upload(f)
        raise


def _abandon_upload(f: Any) -> None:
    """Throw away an unfinished upload.  fsspec's ``__exit__``, ``close`` and even ``__del__``
    would complete it, whole or not, so the file is also marked closed."""
    with contextlib.suppress(Exception):  # the error that brought us here matters more
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()  # s3fs: AbortMultipartUpload of the parts sent so far
    with contextlib.suppress(Exception):
        f.closed = True


def url_key(url: str) -> str:
    """What identifies a document by its URL wherever one is compared or looked up (the
    document cache, a dataset's and a model version's sources): the SHA-256 (hex) of the raw
    URL.  Masking (``redact``) is for display only: it can make two URLs one string
    (``.../auth=public/a.txt`` and ``.../b.txt`` both become ``.../auth=***``)."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


@contextlib.contextmanager
def _local_atomic(path: str, durable: bool = True) -> Iterator[Any]:
    if durable:
        _makedirs_synced(os.path.dirname(path))
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never a torn one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        sync_directory(os.path.dirname(path))


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> None:
    """``data`` at ``path``, seen whole or not at all (see ``open_atomic``)."""
    if not is_local(fs):
        fs.pipe_file(path, data)  # one PUT
        return
    with open_atomic(fs, path, durable) as f:
        f.write(data)


def sync_directory(path: str) -> None:
    """Make a rename or a new file in ``path`` survive a crash (the file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_error(url: str, exc: BaseException) -> str:
    """One line that says what failed and what to check."""
    # masked before it is cut short: a cut inside a URL's password would leave it unrecognisable
    text = redact(" ".join(str(exc).split())) or type(exc).__name__
    hint = ""
    if url.startswith(("s3://", "s3a://")):
        hint = "; check storage.endpoint_url, the bucket name and AWS credentials"
    elif url.startswith(("gs://", "gcs://")):
        hint = "; check the bucket name and Google credentials"
    return redact(f"{url}: {type(exc).__name__}: {text[:300]}{hint}")


# ---------------------------------------------------------------------------------------------
# Conditional writes, for the model registry (train/registry.py): a create that fails when the
# object exists, and a compare-and-swap that replaces an object only if it is still the version
# that was read.  A *tag* names one version of an object: the ETag on S3, the SHA-256 of the
# content elsewhere.  What each backend guarantees is in train/registry.py's docstring.


# A lease renews in a thread while the job publishes.  On NFS, Linux turns flock into a POSIX
# lock, which does not exclude the threads of one process from each other (and any close of the
# file drops it), so local compare-and-swaps also take this process-wide lock.
_LOCAL_CAS = threading.Lock()


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in fs.protocol or "s3a" in fs.protocol


def _content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _makedirs_synced(directory: str) -> None:
    """``os.makedirs``, with each new directory's entry synced in its parent."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        sync_directory(os.path.dirname(path))


LOCK_WAIT_S = 30.0  # how long a local compare-and-swap waits for the lock before it counts as busy


class LockBusy(Busy):
    """A local lock file held longer than ``LOCK_WAIT_S`` (its holder frozen, or a stuck disk)."""


@contextlib.contextmanager
def local_lock(path: str, wait_s: float | None = None) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created if needed), across processes and threads,
    waited for at most ``wait_s`` (default ``LOCK_WAIT_S``), then ``LockBusy``: a holder that is
    frozen (SIGSTOP, a paused VM, a stuck fsync on NFS) must not hang every other job.

    ``flock`` on the lock's own descriptor: released when that descriptor closes, also if the
    process dies.  On NFS, Linux turns it into a POSIX lock that needs the NFS lock manager
    (lockd on NFSv3, built into NFSv4); a ``nolock`` mount makes it local to each host."""
    import fcntl  # POSIX only, like the rest of the local registry's guarantees

    deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
    if not _LOCAL_CAS.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise LockBusy(_lock_busy_message(path))
    try:
        _makedirs_synced(os.path.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_until(fcntl, fd, deadline, path)
            yield
        finally:
            os.close(fd)
    finally:
        _LOCAL_CAS.release()


def _flock_until(fcntl, fd: int, deadline: float, path: str) -> None:
    pause = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockBusy(_lock_busy_message(path)) from None
            time.sleep(pause)
            pause = min(0.25, pause * 2)


def _lock_busy_message(path: str) -> str:
    return (f"the lock file {path} is held by another job for longer than its wait (a frozen or stuck process?); "
            f"this one stops without writing: try again later, or stop the process that holds it "
            f"(`fuser {path}` names it)")


def s3_refusal(exc: BaseException) -> str | None:
    """"precondition" (412) or "conflict" (409) when S3 refused a conditional write, else None.

    s3fs turns a 412 into FileExistsError only when the error names the If-None-Match condition;
    a 412 without it becomes OSError(EINVAL), a 409 ConditionalRequestConflict OSError(EIO); the
    botocore error behind either is kept as ``__cause__``."""
    response = getattr(exc.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    if status == 412 or code == "PreconditionFailed":
        return "precondition"
    if status == 409 or code == "ConditionalRequestConflict":
        return "conflict"
    return None


def _create_local(path: str, data: bytes) -> None:
    _makedirs_synced(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # the kernel decides who creates it
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):  # ours alone (O_EXCL): a torn file must not block others
            os.unlink(path)
        raise
    sync_directory(os.path.dirname(path))


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes, lock: str | None = None) -> str | None:
    """Write ``path`` only if it does not exist yet; FileExistsError if it does, or if S3 answered
    a concurrent conditional write with 409.  Returns the new object's tag when the store tells it.

    Local: ``O_CREAT|O_EXCL``, then the file and its directory are fsynced (inside ``lock``, a
    ``local_lock`` path, when given).  S3: ``If-None-Match: *``.  GCS: gcsfs's
    ``ifGenerationMatch=0``.  Any other fsspec store: fsspec's check-then-write, not exclusive."""
    if is_local(fs):
        with local_lock(lock) if lock else contextlib.nullcontext():
            _create_local(path, data)
        return _content_tag(data)
    try:
        out = fs.pipe_file(path, data, mode="create")
    except OSError as exc:
        if isinstance(exc, FileExistsError) or not s3_refusal(exc):
            raise
        raise FileExistsError(f"{path}: the store refused the create-only write ({s3_refusal(exc)})") from exc
    if is_s3(fs):  # a multipart upload (over 100 MB) returns no ETag here
        return out.get("ETag") if isinstance(out, dict) else None
    return _content_tag(data)


def read_tagged(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str, float | None]:
    """(content, tag, modification time as a POSIX timestamp or None) of ``path``, all from one
    read, so the tag is that of the content returned; FileNotFoundError if there is none."""
    if is_local(fs):
        with open(path, "rb") as f:
            data = f.read()
            return data, _content_tag(data), os.fstat(f.fileno()).st_mtime
    if is_s3(fs):
        return fsspec.asyn.sync(fs.loop, _s3_get, fs, path)
    data = fs.cat_file(path)
    try:
        modified = fs.modified(path).timestamp()
    except Exception:  # noqa: BLE001 - not every store reports it
        modified = None
    return data, _content_tag(data), modified


async def _s3_get(fs, path: str) -> tuple[bytes, str, float | None]:
    bucket, key, _ = fs.split_path(path)
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        data = await body.read()
    modified = response.get("LastModified")
    return data, response["ETag"], modified.timestamp() if modified else None


def replace_if_match(fs: fsspec.AbstractFileSystem, path: str, data: bytes, tag: str | None,
                     lock: str | None = None) -> str | None:
    """Write ``path`` only if it is still the version named ``tag`` (None: only if it does not
    exist); the new tag, or None when the object changed (or appeared, or vanished) meanwhile.

    Local: inside ``lock`` (a ``local_lock`` path, required), read, compare, write a temporary file,
    fsync, rename over ``path``, fsync the directory: readers see the old content or the new, never
    a torn file.  S3: ``If-Match: <ETag>`` (or ``If-None-Match: *``).  GCS: create-only when
    ``tag`` is None, else as other stores.  Other stores: read, compare and write without any
    lock, which narrows a race but does not close it."""
    if is_local(fs):
        if lock is None:
            raise ValueError("a local compare-and-swap needs a lock file")
        with local_lock(lock):
            return _replace_local(path, data, tag)
    if tag is None:
        try:
            return create_exclusive(fs, path, data)
        except FileExistsError:
            return None
    if is_s3(fs):
        try:
            out = fs.pipe_file(path, data, IfMatch=tag)
        except FileNotFoundError:  # If-Match on an object that is gone: 404
            return None
        except OSError as exc:
            if s3_refusal(exc):
                return None
            raise
        return out.get("ETag") if isinstance(out, dict) else None
    try:
        current = fs.cat_file(path)
    except FileNotFoundError:
        return None
    if _content_tag(current) != tag:
        return None
    fs.pipe_file(path, data)
    return _content_tag(data)


def _replace_local(path: str, data: bytes, tag: str | None) -> str | None:
    """The local compare-and-swap; the caller holds the lock that every writer of ``path`` takes."""
    try:
        with open(path, "rb") as f:
            current = _content_tag(f.read())
    except FileNotFoundError:
        current = None
    if current != tag:
        return None
    with _local_atomic(path) as f:
        f.write(data)
    return _content_tag(data)


from charnn.storage.run import RunStorage  # noqa: E402, F401 - it builds on the Store above
