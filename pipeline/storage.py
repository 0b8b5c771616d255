"""One place that turns a URL (local path, s3://, gs://, any fsspec URL) into a filesystem.

The spec's ``storage`` section carries an S3 endpoint override (MinIO, moto); the
credentials themselves come from the environment, as boto expects, never from a spec.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import Any

import fsspec


# Attempts per S3 request when the spec says nothing: standard mode backs off exponentially
# (up to 20 s), so an endpoint that is away for tens of seconds costs a pause, not the run.
S3_ATTEMPTS = 10


def s3_attempts(storage: Any | None) -> int:
    return getattr(storage, "max_attempts", None) or S3_ATTEMPTS


class StorageError(RuntimeError):
    """A URL that cannot be reached, listed or written."""


def fsspec_options(url: str, storage: Any | None) -> dict:
    """Keyword arguments for fsspec's filesystem behind ``url``."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        options: dict = {"config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": s3_attempts(storage), "mode": "standard"}}}
        if storage is not None:
            if storage.endpoint_url:
                options["endpoint_url"] = storage.endpoint_url
            if storage.region:
                options["client_kwargs"] = {"region_name": storage.region}
            if storage.anon:
                options["anon"] = True
        return options
    if protocol in ("gs", "gcs") and storage is not None and storage.anon:
        return {"token": "anon"}
    return {}


def open_url(url: str, storage: Any | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for ``url``; ``~`` is expanded for local paths."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return fsspec.core.url_to_fs(url, **fsspec_options(url, storage))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> None:
    """Readers see the whole file or nothing: an object PUT is atomic, a local file is renamed into
    place; ``durable`` local files are synced to disk before the rename."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


_SECRETS = (
    (re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@"), "***@"),  # user:password@ in a URL
    (re.compile(r"(?i)\b((?:x-amz-)?(?:signature|credential|security-token|token|secret|password|sig)=)[^&\s'\"]+"), r"\1***"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AKIA***"),  # AWS access key ids
)


def redact(text: str) -> str:
    """``text`` with credentials that URLs and keys can carry masked, for logs, errors and records."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def describe_error(url: str, exc: BaseException) -> str:
    """One line that says what failed and what to check."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    hint = ""
    if url.startswith(("s3://", "s3a://")):
        hint = "; check storage.endpoint_url, the bucket name and AWS credentials"
    elif url.startswith(("gs://", "gcs://")):
        hint = "; check the bucket name and Google credentials"
    return redact(f"{url}: {type(exc).__name__}: {text[:300]}{hint}")
