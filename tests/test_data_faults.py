"""Damaged or unreachable data-side storage (no Ray): a damaged cache index, an upload cut short
on S3, an unreachable dataset root and a damaged sources table are each one line, never a
traceback, and never leave a partial object under its final name."""
from __future__ import annotations

import logging

import pyarrow as pa
import pytest

from support.jobs import write_corpus
from support.servers import free_port
from charnn.data.build import DatasetRequest, listed_documents, write_dataset
from charnn.data.cache import cache_url, encode_group
from charnn.data.sources import list_documents
from charnn.storage import StorageError, Store, open_atomic


def request(tmp_path, corpus, root=None, store=Store()) -> DatasetRequest:
    return DatasetRequest([str(corpus)], "gorner98", 4, 2, 1, 0.25, 64, root or str(tmp_path / "ds"), store)


def index_files(tmp_path) -> list:
    return sorted((tmp_path / "ds" / cache_url("", "gorner98").lstrip("/") / "index").iterdir())


def test_a_damaged_cache_index_is_skipped_with_one_warning_and_its_documents_encoded_again(tmp_path, caplog):
    corpus = tmp_path / "c"
    write_corpus(corpus, 4, 20)
    listing = list_documents([str(corpus)])
    encode_group(listing.slice(0, 2), str(tmp_path / "ds"), "gorner98")
    damaged = index_files(tmp_path)[0]
    encode_group(listing.slice(2, 2), str(tmp_path / "ds"), "gorner98")
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 2])  # as a torn upload leaves it
    with caplog.at_level(logging.WARNING, logger="charnn.pipeline"):
        found = listed_documents(request(tmp_path, corpus))
    assert [i is not None for i in found.column("identity").to_pylist()] == [False, False, True, True]
    (line,) = [r.getMessage() for r in caplog.records]
    assert damaged.name in line and "re-encoded" in line and "delete" in line and "\n" not in line


@pytest.mark.parametrize("parts", [0, 2], ids=["one-put", "multipart"])
def test_an_error_inside_open_atomic_leaves_nothing_under_the_final_name_on_s3(moto_s3, parts):
    import s3fs

    class Interrupted(BaseException):
        pass

    bucket, client = f"charnn-open-atomic-{parts}", moto_s3.client()
    client.create_bucket(Bucket=bucket)
    # parts of 5 MB (S3's least): each 6 MB write below sends one
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3.endpoint, default_block_size=5 * 2**20, skip_instance_cache=True)
    path, chunks = f"{bucket}/documents/index/x.parquet", [b"P" * 6 * 2**20] * parts or [b"PAR1" + b"\0" * 1000]
    with pytest.raises(Interrupted):
        with open_atomic(fs, path) as f:
            for chunk in chunks:
                f.write(chunk)
            uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            assert [len(client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])["Parts"])
                    for u in uploads] == ([parts] if parts else [])
            raise Interrupted  # a cancelled task, MemoryError, a bug
    fs.invalidate_cache()
    assert not fs.exists(path)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted, not left to bill
    with open_atomic(fs, path) as f:  # and a write that completes is there, whole
        for chunk in chunks:
            f.write(chunk)
    fs.invalidate_cache()
    assert fs.size(path) == sum(map(len, chunks))


def unreachable() -> Store:
    return Store(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)


def test_an_unreachable_dataset_root_is_one_line(tmp_path):
    corpus = tmp_path / "c"
    write_corpus(corpus, 2, 20)
    store = unreachable()
    with pytest.raises(StorageError, match=r"^data.dataset_root: cannot .*s3://nowhere/datasets/.*check storage.endpoint_url") \
            as info:
        listed_documents(request(tmp_path, corpus, "s3://nowhere/datasets", store))
    assert "\n" not in str(info.value)
    with pytest.raises(StorageError, match=r"^data.dataset_root: cannot .*s3://nowhere/datasets/.*check storage.endpoint_url"):
        encode_group(list_documents([str(corpus)]), "s3://nowhere/datasets", "gorner98", store)
    documents = pa.table({"url": ["/c/a.txt", "/c/b.txt"], "key": ["a.txt", "b.txt"], "size": [400, 400],
                          "identity": ["sha256:a", "sha256:b"], "split": ["train", "val"], "blob": ["b", "b"],
                          "offset": [0, 400], "tokens": [400, 400], "unknown": [0.0, 0.0]})
    with pytest.raises(StorageError, match=r"^data.dataset_root: cannot .*s3://nowhere/datasets/.*check storage.endpoint_url") \
            as info:
        write_dataset(request(tmp_path, corpus, "s3://nowhere/datasets", store), documents)
    assert "\n" not in str(info.value)


def test_a_keep_splits_table_that_cannot_be_read_is_one_line(tmp_path):
    from charnn.data.build import PipelineError

    corpus = tmp_path / "c"
    write_corpus(corpus, 2, 20)
    (tmp_path / "damaged.parquet").write_bytes(b"PAR1 not really")
    for keep, error in ((tmp_path / "missing.parquet", StorageError), (tmp_path / "damaged.parquet", PipelineError)):
        with pytest.raises(error, match=str(keep)) as info:
            listed_documents(DatasetRequest([str(corpus)], "gorner98", 4, 2, 1, 0.25, 64, str(tmp_path / "ds"),
                                            keep_splits=str(keep)))
        assert "\n" not in str(info.value)


def manifest_at(url: str):
    from charnn.data.dataset import Manifest

    return Manifest("gorner98", 98, 8, 2, "r", 0.25, 1, {}, format="charnn.rows/2", url=url)


def test_a_damaged_sources_table_is_one_line_that_says_to_rebuild(tmp_path):
    from charnn.data.dataset import DatasetError

    (tmp_path / "sources.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=rf"{tmp_path}/sources.parquet is damaged .*delete {tmp_path} ") as info:
        manifest_at(str(tmp_path)).sources()
    assert "\n" not in str(info.value)


def test_a_sources_table_without_url_keys_is_read_with_them(tmp_path):
    import pyarrow.parquet as pq

    from charnn.storage import url_key

    pq.write_table(pa.table({"url": ["/c/a.txt"], "key": ["a.txt"], "size": [9], "identity": ["sha256:a"],
                             "tokens": [9], "split": ["train"]}), tmp_path / "sources.parquet")
    (row,) = manifest_at(str(tmp_path)).sources().to_pylist()
    assert row["url_key"] == url_key("/c/a.txt") and row["identity"] == "sha256:a"
