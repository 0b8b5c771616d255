"""Two S3 operations that s3fs's public API lacks, on its own client and event loop.

- ``list_objects``: a listing consumed one page (1,000 keys) at a time; ``find`` would hold
  every object's full record, and cache it, before returning.
- ``get_all``: whole small objects, many at once, each GET carrying ``If-Match`` with the
  listed ETag, so that a document that changed since the listing fails instead of being read
  (one request per document; ``open`` costs a HEAD first).

Both use s3fs's coroutines (``_iterdir``, ``_call_s3``), which are not public: s3fs is pinned
in constraints.txt, and the tests exercise both against moto's S3 server.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import fsspec.asyn

CONCURRENT_GETS = 32


def list_objects(fs, path: str, add: Callable[[str, dict], None]) -> None:
    """``add(path, info)`` for every object under ``path``."""
    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""

    async def pages():
        async for info in fs._iterdir(bucket, delimiter="", prefix=prefix):
            add(info["name"], info)

    fsspec.asyn.sync(fs.loop, pages)


def get_all(fs, objects: list[tuple[str, str]]) -> list[bytes | Exception]:
    """The bytes of each (path, ETag), or the exception its GET raised, in order."""
    limit = asyncio.Semaphore(CONCURRENT_GETS)

    async def get(path: str, etag: str) -> bytes:
        bucket, key, _ = fs.split_path(path)
        async with limit:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
            try:
                return await response["Body"].read()
            finally:
                response["Body"].close()

    async def everything():
        return await asyncio.gather(*(get(p, e) for p, e in objects), return_exceptions=True)

    return fsspec.asyn.sync(fs.loop, everything)
