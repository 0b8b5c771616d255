"""The document cache: encoded documents packed into blobs, found through an index.

Under ``<dataset_root>/documents/v2/<alphabet>/``::

    blobs/<id>.u8          the codes of one group of documents, back to back
    index/<id>.parquet     one row per document of that blob (``INDEX``), written once the blob is whole

A group is one encode task: many small documents, or one large one, up to about
``GROUP_BYTES`` of input, read and encoded in chunks of ``CHUNK`` bytes (bounded memory
whatever a document's size, ``.gz`` included).  A document's ``identity`` is the SHA-256 of the
bytes read; the cache finds a document again by (``url_key``, size, version) as listed, so an
unchanged document is neither read nor encoded twice, and two documents never share an entry
because their stores gave them the same ETag, or because their URLs look alike once masked
(the index stores URLs masked, for display, and the SHA-256 of the raw URL to find them by).
An index file written before ``url_key`` existed is read with the key of its masked URL: an
unmasked URL still finds its entry, a masked one finds none and is encoded again.  A damaged
index file is skipped with a warning: its documents are encoded again.  A document that
changes between the listing and the end of its read is an error: its listed version and size
are checked before and after (S3 reads also carry ``If-Match`` with the ETag).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import logging
import os
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from charnn.errors import CharnnError, UserError
from charnn.storage import s3
from charnn.data.alphabet import StreamEncoder, encode_bytes
from charnn.data.sources import store_version, url_keys
from charnn.storage import (StorageError, Store, describe_error, is_local, join, protocol, redact, redact_urls,
                            s3_refusal)
from charnn.storage.run import CACHE_VERSION, document_cache_url  # noqa: F401 - CACHE_VERSION: retention's

CHUNK = 4 * 2**20  # bytes read at a time; documents up to this size are read whole
READ_AHEAD = 64, 32 * 2**20  # small remote documents fetched together by an encode task: count, bytes
BOMB_RATIO, BOMB_FLOOR = 100, 64 * 2**20  # a .gz may expand this much (text: 3-5x)
INDEX = pa.schema([
    ("url", pa.string()), ("url_key", pa.string()), ("size", pa.int64()), ("version", pa.string()),
    ("identity", pa.string()), ("blob", pa.string()), ("offset", pa.int64()), ("tokens", pa.int64()),
    ("unknown", pa.float64()),
])
FOUND_BY = ["url_key", "size", "version"]  # what finds a document in the index
FIGURES = INDEX.names[4:]  # what encoding a document finds out
RESULT = pa.schema([*INDEX, ("error", pa.string())])
INDEX_READERS = 16  # index files read at once: one small GET each on an object store

log = logging.getLogger("charnn.pipeline")


class DocumentError(UserError):
    """One document that cannot be read as listed; the message says why and what to do."""


def cache_url(root: str, alphabet: str) -> str:
    return document_cache_url(root, alphabet)


@contextlib.contextmanager
def dataset_root_access(url: str, what: str):
    """Any failure to reach ``data.dataset_root`` (an endpoint away, a bucket or a permission
    missing) as one line that says what could not be done and what to check."""
    try:
        yield
    except CharnnError:
        raise
    except Exception as exc:  # noqa: BLE001 - whichever backend raised it
        text = describe_error(url, exc)
        hint = "" if "; check " in text else "; check that data.dataset_root exists and is writable"
        raise StorageError(f"data.dataset_root: cannot {what}: {text}{hint}") from None


def load_index(root: str, alphabet: str, store: Store = Store()) -> pa.Table:
    """Every cached document with a trustworthy version, one row per (url_key, size, version)."""
    url = join(cache_url(root, alphabet), "index")
    with dataset_root_access(url, "read the document cache's index"):
        files = [join(url, name) for name in store.list(url) if name.endswith(".parquet")]
        with ThreadPoolExecutor(INDEX_READERS, thread_name_prefix="charnn-index") as pool:
            read = list(pool.map(lambda file: _read_index_file(store, file), files))
    _warn_damaged([(file, r) for file, r in zip(files, read) if isinstance(r, Exception)])
    tables = [r for r in read if isinstance(r, pa.Table)]
    if not tables:
        return INDEX.empty_table()
    table = pa.concat_tables(tables)
    table = table.filter(pc.not_equal(table.column("version"), ""))
    return table.group_by(FOUND_BY, use_threads=False).aggregate(
        [(name, "first") for name in ["url", *FIGURES]]
    ).rename_columns([*FOUND_BY, "url", *FIGURES]).select(INDEX.names)


def _read_index_file(store: Store, url: str) -> pa.Table | Exception | None:
    """One index file (``INDEX``), the exception that shows it damaged, or None if it is gone."""
    try:
        data = store.read(url)
    except FileNotFoundError:  # removed since the listing: its documents are simply not cached
        return None
    try:
        table = pq.read_table(pa.BufferReader(data))
        if "url_key" not in table.column_names:  # written before url_key: the key of the URL it stored
            table = table.append_column("url_key", url_keys(table.column("url")))
        return table.select(INDEX.names).cast(INDEX)
    except Exception as exc:  # noqa: BLE001 - whatever a torn or foreign file makes the reader say
        return exc


def _warn_damaged(damaged: list[tuple[str, Exception]]) -> None:
    """One line for every damaged index file: a build goes on without them."""
    if damaged:
        (url, first), more = damaged[0], f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        cause = " ".join(f"{type(first).__name__}: {first}".split())[:200]
        log.warning("%s%s: damaged document cache index skipped (%s); the documents it lists will be re-encoded; "
                    "delete it to stop this warning", redact(url), more, redact(cause))


def lookup(listing: pa.Table, index: pa.Table) -> pa.Table:
    """The listing with each document's cache entry, or nulls where it has none, in URL order."""
    if index.num_rows == 0:
        for name in FIGURES:
            listing = listing.append_column(INDEX.field(name), pa.nulls(listing.num_rows, INDEX.field(name).type))
        return listing
    found = listing.join(index.select([*FOUND_BY, *FIGURES]), keys=FOUND_BY, join_type="left outer",
                         use_threads=False)
    return found.sort_by("url")


def index_rows(encoded: pa.Table) -> pa.Table:
    """The ``INDEX`` rows of documents encoded under their raw URLs: each found by its raw
    URL's key, and the URL itself masked, so that the cache holds no credentials."""
    keys = url_keys(encoded.column("url"))
    urls = redact_urls(encoded.column("url"))
    encoded = encoded.drop_columns([c for c in ("url", "url_key") if c in encoded.column_names])
    return encoded.append_column("url", urls).append_column("url_key", keys).select(INDEX.names).cast(INDEX)


def _changed(what: str) -> DocumentError:
    return DocumentError(f"it {what} after the sources were listed or while it was read; run the job again")


@contextlib.contextmanager
def _as_listed():
    """A document that vanished or changed under a read is the user's one-line error."""
    try:
        yield
    except FileNotFoundError:
        raise DocumentError("it disappeared after the sources were listed; run the job again") from None
    except PermissionError as exc:
        raise DocumentError(f"it cannot be read ({exc.strerror or 'permission denied'}); make it readable "
                            f"or leave it out of data.sources") from None
    except OSError as exc:
        if type(exc).__name__ == "FileExpired" or s3_refusal(exc) == "precondition":  # an If-Match failed
            raise _changed("changed") from None
        raise


class _ListedFile:
    """A document opened for reading if it is still the one listed; ``verify`` checks it still is
    after the read (locally its size and mtime, on S3 every read carried If-Match)."""

    def __init__(self, doc: dict, fs):
        self.doc, self.fs = doc, fs
        self.path = doc["url"] if is_local(fs) else fs._strip_protocol(doc["url"])
        self.protocol = protocol(fs)
        if is_local(self.fs):
            self.file = open(self.path, "rb")
        else:
            self.file = self.fs.open(self.path, "rb", block_size=CHUNK, cache_type="none")
        self._check(self._now())

    def _now(self) -> tuple[int, str]:
        if is_local(self.fs):
            return _local_version(os.fstat(self.file.fileno()))
        return self.file.size, store_version(self.file.details, self.protocol)

    def _check(self, now: tuple[int, str]) -> None:
        if self.doc["version"] and now != (self.doc["size"], self.doc["version"]):
            self.close()
            raise _changed("changed")

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def verify(self, read: int) -> None:
        if is_local(self.fs) or self.protocol not in ("s3", "s3a"):
            self.fs.invalidate_cache(self.path)
            self._check(self._now() if is_local(self.fs) else
                        (read, store_version(self.fs.info(self.path), self.protocol)))
        if self.protocol not in ("http", "https") and read != self.doc["size"]:  # HTTP may give no length
            raise _changed("changed size")

    def close(self) -> None:
        self.file.close()


def _filesystems(store: Store):
    """The filesystem of a URL, made once per scheme (fsspec's own lookup costs more than a
    small document's read)."""
    made: dict[str, Any] = {}

    def of(url: str):
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme not in made:
            made[scheme] = store.fs(url)[0]
        return made[scheme]

    return of


def _fetch(doc: dict, fs) -> bytes:
    """A small remote document, whole and checked (runs on a reading thread)."""
    with _as_listed():
        listed = _ListedFile(doc, fs)
        try:
            data = listed.read()
            listed.verify(len(data))
        finally:
            listed.close()
    return data


def _fetch_all(docs: list[dict], fs_of, pool: ThreadPoolExecutor) -> list[bytes | Exception]:
    """Small remote documents, whole, fetched together: a store's latency, not its bandwidth,
    bounds them.  On S3 each is one GET with If-Match (the listed ETag)."""
    fs = fs_of(docs[0]["url"])
    if protocol(fs) not in ("s3", "s3a") or any(fs_of(d["url"]) is not fs for d in docs):
        futures = [pool.submit(_fetch, doc, fs_of(doc["url"])) for doc in docs]
        return [f.exception() or f.result() for f in futures]
    etags = [f'"{d["version"].split(":", 1)[1]}"' if d["version"].startswith("etag:") else "" for d in docs]
    fetched = s3.get_all(fs, [(fs._strip_protocol(d["url"]), e) for d, e in zip(docs, etags)])
    return [_changed("changed size") if isinstance(data, bytes) and len(data) != doc["size"] else data
            for doc, data in zip(docs, fetched)]


def _prefetched(docs: list[dict], fs_of, pool: ThreadPoolExecutor):
    """(document, its bytes, an exception, or None: read it here), in order; small remote
    documents come in batches of ``READ_AHEAD``."""
    batch: list[dict] = []
    for doc in docs:
        small_remote = "://" in doc["url"] and not doc["url"].startswith("file://") and doc["size"] <= CHUNK
        if small_remote:
            batch.append(doc)
        full = len(batch) == READ_AHEAD[0] or sum(d["size"] for d in batch) >= READ_AHEAD[1]
        if batch and (full or not small_remote):
            yield from zip(batch, _fetch_all(batch, fs_of, pool))
            batch = []
        if not small_remote:
            yield doc, None
    if batch:
        yield from zip(batch, _fetch_all(batch, fs_of, pool))


class _HashingReader:
    """A file object that hashes and counts the bytes read through it."""

    def __init__(self, raw):
        self.raw, self.sha, self.count = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def _text_chunks(stream, compressed: _HashingReader, gz: bool):
    """Chunks of a document's text: its bytes, or their gunzipped content within a ratio."""
    expanded = 0
    try:
        while chunk := stream.read(CHUNK):
            expanded += len(chunk)
            if gz and expanded > max(BOMB_FLOOR, BOMB_RATIO * compressed.count):
                raise DocumentError(f"it expands to over {BOMB_RATIO} times its size when gunzipped: "
                                    f"a decompression bomb, or not text; leave it out of data.sources")
            yield chunk
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DocumentError(f"it is not a valid gzip file ({exc}); repair it or leave it out of data.sources") \
            from None


def encode_whole(data: bytes, alphabet: str, sink) -> dict:
    """Encode a plain document held whole into ``sink`` (most documents are small)."""
    codes = encode_bytes(data, alphabet)
    sink.write(codes)
    return _figures(hashlib.sha256(data), len(codes), codes.count(0), alphabet, len(data))


def encode_stream(raw, gz: bool, alphabet: str, sink) -> dict:
    """Encode a document read from ``raw`` ``CHUNK`` bytes at a time into ``sink``: its identity
    (the SHA-256 of the bytes read), tokens, unknown share and the bytes read."""
    compressed = _HashingReader(raw)
    stream = gzip.GzipFile(fileobj=compressed, mode="rb") if gz else compressed
    encoder, tokens, unknown = StreamEncoder(alphabet), 0, 0
    for text in itertools.chain(_text_chunks(stream, compressed, gz), [None]):
        codes = encoder.feed(text or b"", final=text is None)
        sink.write(codes)
        tokens, unknown = tokens + len(codes), unknown + codes.count(0)
    while compressed.read(CHUNK):  # what follows a gzip stream's end still counts, and is hashed
        pass
    return _figures(compressed.sha, tokens, unknown, alphabet, compressed.count)


def _figures(sha, tokens: int, unknown: int, alphabet: str, read: int) -> dict:
    share = unknown / tokens if tokens and alphabet == "gorner98" else 0.0
    return {"identity": "sha256:" + sha.hexdigest(), "tokens": tokens, "unknown": share, "read": read}


class _Counted:
    """A file being written that counts the bytes written: where the next document starts."""

    def __init__(self, file):
        self.file, self.offset = file, 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.offset += len(data)


def encode_group(group: pa.Table, root: str, alphabet: str, store: Store = Store()) -> pa.Table:
    """One read task of the encode stage: encode a group of listed documents into one new blob and index it.

    Returns one row of figures per document (identity, blob, offset, tokens, unknown, error); a
    document that cannot be read is an ``error`` (one line), not an exception, so that the
    driver reports every failure at once.  Codes
    that a failed document left in the blob are named by no index row."""
    blob = uuid.uuid4().hex
    base = cache_url(root, alphabet)
    with dataset_root_access(base, "write the document cache"):
        with store.open_atomic(join(base, "blobs", f"{blob}.u8")) as file:  # synced before the index that names its codes
            rows = _encode_into(_Counted(file), group, alphabet, blob, store)
    result = pa.Table.from_pylist(rows, schema=RESULT)
    good = index_rows(result.filter(pc.is_null(result.column("error"))).drop_columns(["error"]))
    if good.num_rows:
        with dataset_root_access(base, "write the document cache"):
            with store.open_atomic(join(base, "index", f"{blob}.parquet")) as f:
                pq.write_table(good, f)
    # what the driver needs, in the group's order; the blob's id goes back once, not per document
    figures = result.select([*FIGURES, "error"])
    return figures.set_column(1, "blob", pc.dictionary_encode(figures.column("blob")))


def _encode_into(sink: _Counted, group: pa.Table, alphabet: str, blob: str, store: Store) -> list[dict]:
    """Each document's row of ``RESULT``: its figures, or its error."""
    rows, fs_of = [], _filesystems(store)
    with ThreadPoolExecutor(16, thread_name_prefix="charnn-read") as pool:
        for doc, fetched in _prefetched(group.select(["url", "size", "version"]).to_pylist(), fs_of, pool):
            offset = sink.offset
            try:
                figures = _encode_listed(doc, fetched, alphabet, sink, fs_of)
                rows.append({**doc, **figures, "blob": blob, "offset": offset})
            except DocumentError as exc:
                rows.append({**doc, "error": redact(f"{doc['url']}: {exc}")})
            except Exception as exc:  # noqa: BLE001 - reported by the driver, with every other failure
                rows.append({**doc, "error": describe_error(doc["url"], exc)})
    return rows


def _encode_listed(doc: dict, fetched, alphabet: str, sink, fs_of) -> dict:
    """One document's figures: from the bytes fetched ahead, or read and checked here."""
    gz = doc["url"].endswith(".gz")
    with _as_listed():
        if isinstance(fetched, Exception):
            raise fetched
        if fetched is None and not gz and doc["size"] <= CHUNK and "://" not in doc["url"]:
            fetched = _read_small_local(doc)
        if fetched is not None and not gz:
            return encode_whole(fetched, alphabet, sink)
        if fetched is not None:
            return encode_stream(io.BytesIO(fetched), gz, alphabet, sink)
        listed = _ListedFile(doc, fs_of(doc["url"]))
        try:
            figures = encode_stream(listed, gz, alphabet, sink)
            listed.verify(figures["read"])
        finally:
            listed.close()
    return figures


def _local_version(st: os.stat_result) -> tuple[int, str]:
    return st.st_size, f"mtime_ns:{st.st_mtime_ns}"


def _read_small_local(doc: dict) -> bytes:
    """A small local document in one read, between two checks that it is still as listed
    (the cheap path that most documents take: a few system calls)."""
    listed = (doc["size"], doc["version"])
    fd = os.open(doc["url"], os.O_RDONLY)
    try:
        if _local_version(os.fstat(fd)) != listed:
            raise _changed("changed")
        parts = [os.read(fd, doc["size"] + 1)]
        while parts[-1] and sum(map(len, parts)) <= doc["size"]:
            parts.append(os.read(fd, doc["size"] + 1))
        data = b"".join(parts)
        if len(data) != doc["size"] or _local_version(os.fstat(fd)) != listed:
            raise _changed("changed")
    finally:
        os.close(fd)
    return data
