"""Documents: what ``data.sources`` names, listed with metadata only, and the stable split rule."""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

from pipeline.corpora import corpus_path
from pipeline.storage import StorageError, describe_error, open_url

GLOB_CHARS = "*?["
SPLIT_RULE = "sha256(key) < val_fraction; else the smallest hash; one document: its tail"


@dataclass(frozen=True)
class Document:
    url: str  # full URL, protocol included for remote stores
    key: str  # path relative to the source that named it: what the split hashes
    size: int
    etag: str | None  # content identity the store gives for free, if any


def _full_url(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local") or "://" in path:  # HTTP paths are full URLs already
        return path
    return f"{protocol}://{path}"


def store_identity(info: dict) -> str | None:
    """The content identity a store gives for free (ETag, md5, crc32c), if any."""
    for field in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(field):
            return f"{field.lower()}:{str(info[field]).strip(chr(34))}"
    return None


def _expand(source: str) -> str:
    return corpus_path(source[len("corpus:"):]) if source.startswith("corpus:") else source


def list_documents(sources: list[str], storage: Any | None = None) -> list[Document]:
    """Every file the sources name, sorted by URL; the driver sees metadata only."""
    documents: dict[str, Document] = {}
    for source in sources:
        url = _expand(source)
        try:
            fs, path = open_url(url, storage)
            fs.invalidate_cache()  # a listing cached by an earlier build would hide new files
            if any(c in path for c in GLOB_CHARS):
                root = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
                infos = fs.glob(path, detail=True)
            elif fs.isdir(path):
                root, infos = path, fs.find(path, detail=True)
            else:
                root, infos = posixpath.dirname(path), {path: fs.info(path)} if fs.exists(path) else {}
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
            raise StorageError(f"cannot list source {describe_error(url, exc)}") from None
        files = {p: i for p, i in infos.items() if i.get("type") == "file" and not posixpath.basename(p).startswith(".")}
        if not files:
            raise StorageError(f"source {source!r} matches no files; check the path, glob or bucket")
        for p, info in files.items():
            doc_url = _full_url(fs, p)
            documents[doc_url] = Document(doc_url, posixpath.relpath(p, root), int(info.get("size") or 0), store_identity(info))
    return [documents[u] for u in sorted(documents)]


def split_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def assign_splits(keys: list[str], val_fraction: float) -> dict[str, str]:
    """'train' or 'val' per document key; a document's split depends only on its own key
    unless no key falls under ``val_fraction`` (then the smallest hash is validation).
    A single document is 'both': its last ``val_fraction`` of tokens are validation."""
    if len(keys) == 1:
        return {keys[0]: "both"}
    splits = {k: "val" if split_hash(k) < val_fraction else "train" for k in keys}
    if "val" not in splits.values():
        splits[min(keys, key=split_hash)] = "val"
    if "train" not in splits.values():
        splits[max(keys, key=split_hash)] = "train"
    return splits


def content_hash(data: bytes) -> str:
    """The identity of a document whose store gives none (local files): what the cache is keyed by."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content_identity(document: Document, storage: Any | None = None) -> str:
    """The store's ETag-like identity, else the content hash (reads the file)."""
    if document.etag:
        return document.etag
    try:
        fs, path = open_url(document.url, storage)
        return content_hash(fs.cat_file(path))
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read source {describe_error(document.url, exc)}") from None
