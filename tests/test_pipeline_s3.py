"""The pipeline against S3 (moto's server on 127.0.0.1): same rows as from local files."""
import gzip
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import MotoServer, free_port
from pipeline.build import DatasetRequest, build_dataset
from pipeline.reader import SplitReader, load_manifest
from jobs.spec import StorageConfig
from pipeline.storage import StorageError

pytestmark = pytest.mark.ray


def storage(endpoint, max_attempts=None):
    return SimpleNamespace(endpoint_url=endpoint, region=None, anon=False, max_attempts=max_attempts)


def request(sources, root, endpoint=None, max_attempts=None):
    return DatasetRequest(sources=sources, alphabet="gorner98", seq_len=8, rows=4, workers=2, val_fraction=0.25,
                          shard_mb=1, dataset_root=root, storage=storage(endpoint, max_attempts))


def all_rows(url, endpoint=None):
    manifest = load_manifest(url, storage(endpoint))
    rows = {}
    for split in ("train", "val"):
        for rank in range(2):
            reader = SplitReader(url, manifest, split, rank, 2, storage(endpoint))
            rows[split, rank] = np.concatenate([w for _, w in reader.windows()], axis=1)
    return manifest, rows


def test_s3_sources_and_s3_dataset_match_the_local_build(ray_local, tmp_path, corpus, moto_s3, bucket):
    source = moto_s3.upload_dir(bucket, "corpus", corpus)
    local_manifest, local_rows = all_rows(build_dataset(request([str(corpus)], str(tmp_path / "ds"))))
    s3_url = build_dataset(request([source], f"s3://{bucket}/datasets", moto_s3.endpoint))
    assert s3_url.startswith(f"s3://{bucket}/datasets/")
    s3_manifest, s3_rows = all_rows(s3_url, moto_s3.endpoint)
    assert all(d["identity"].startswith("etag:") for d in s3_manifest["sources"])
    assert [d["split"] for d in s3_manifest["sources"]] == [d["split"] for d in local_manifest["sources"]]
    for split in ("train", "val"):
        assert {k: v for k, v in s3_manifest["splits"][split].items()} == local_manifest["splits"][split]
    assert s3_rows.keys() == local_rows.keys()
    assert all(np.array_equal(s3_rows[k], local_rows[k]) for k in local_rows)


def test_gzip_sources_read_as_their_text(ray_local, tmp_path, corpus):
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for path in corpus.iterdir():
        (zipped / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    plain = load_manifest(build_dataset(request([str(corpus)], str(tmp_path / "a"))))
    packed = load_manifest(build_dataset(request([str(zipped)], str(tmp_path / "b"))))
    assert [d["tokens"] for d in packed["sources"]] == [d["tokens"] for d in plain["sources"]]


def test_unreachable_endpoint_is_one_clear_error(ray_local, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match="cannot list source s3://nowhere/corpus.*check storage.endpoint_url") as info:
        build_dataset(request(["s3://nowhere/corpus"], str(tmp_path / "ds"), closed, max_attempts=2))
    assert "\n" not in str(info.value)


def test_wrong_credentials_are_one_clear_error(ray_local, tmp_path, corpus):
    # moto checks keys once its first unauthenticated actions (bucket + uploads) are used up
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": str(1 + len(list(corpus.iterdir())))}).start()
    try:
        server.client().create_bucket(Bucket="locked")
        source = server.upload_dir("locked", "corpus", corpus)
        with pytest.raises(StorageError, match="cannot list source s3://locked/corpus.*credentials"):
            build_dataset(request([source], str(tmp_path / "ds"), server.endpoint))
    finally:
        server.stop()
    assert not (tmp_path / "ds").exists()


def test_missing_bucket_is_one_clear_error(ray_local, tmp_path, moto_s3):
    with pytest.raises(StorageError, match="s3://no-such-bucket/x"):
        build_dataset(request(["s3://no-such-bucket/x"], str(tmp_path / "ds"), moto_s3.endpoint))


def test_a_source_that_changes_or_vanishes_after_listing_is_an_error(moto_s3, bucket, tmp_path):
    from pipeline.build import _encode_document
    from pipeline.sources import list_documents

    storage = StorageConfig(endpoint_url=moto_s3.endpoint)
    client = moto_s3.client()
    for name in ("a.txt", "b.txt"):
        client.put_object(Bucket=bucket, Key=f"corpus/{name}", Body=b"To be, or not to be.\n" * 20)
    listed = {d.key: d for d in list_documents([f"s3://{bucket}/corpus"], storage)}
    client.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"Another version.\n" * 20)
    client.delete_object(Bucket=bucket, Key="corpus/b.txt")
    rows = {k: {"url": d.url, "key": k, "size": d.size, "etag": d.etag, "split": "train"} for k, d in listed.items()}
    options = {"root": str(tmp_path / "datasets"), "alphabet": "gorner98", "storage": storage}
    changed, vanished = _encode_document(rows["a.txt"], **options), _encode_document(rows["b.txt"], **options)
    assert "changed after the sources were listed" in changed["error"]
    assert "disappeared after the sources were listed" in vanished["error"]
    assert not (tmp_path / "datasets").exists()  # nothing was cached under the stale identity


def test_a_local_source_that_changes_after_listing_is_an_error(tmp_path):
    from pipeline.build import _encode_document
    from pipeline.sources import list_documents

    path = tmp_path / "corpus" / "a.txt"
    path.parent.mkdir()
    path.write_text("To be, or not to be.\n" * 20)
    (document,) = list_documents([str(path.parent)])
    path.write_text("To be, or not to be, that is the question.\n" * 20)
    row = {"url": document.url, "key": document.key, "size": document.size, "etag": "", "split": "train"}
    result = _encode_document(row, root=str(tmp_path / "datasets"), alphabet="gorner98", storage=None)
    assert "changed after the sources were listed" in result["error"]
