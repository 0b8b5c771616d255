"""The pipeline against S3 (moto's server on 127.0.0.1): same rows as from local files."""
import dataclasses
import gzip

from charnn.data.alphabet import encode

import numpy as np
import pytest

from support.servers import MotoServer, free_port
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.reader import SplitReader
from charnn.data.dataset import load_manifest
from charnn.data.operators import StageOptions
from charnn.storage import Store
from charnn.storage import StorageError

pytestmark = pytest.mark.ray


def storage(endpoint, max_attempts=None):
    return Store(endpoint_url=endpoint, **({"max_attempts": max_attempts} if max_attempts else {}))


def request(sources, root, endpoint=None, max_attempts=None):
    return DatasetRequest(sources=sources, alphabet="gorner98", seq_len=8, rows=4, workers=2, val_fraction=0.25,
                          shard_mb=1, dataset_root=root, store=storage(endpoint, max_attempts),
                          stage=StageOptions(in_process_bytes=0))  # Ray Data's tasks, however small


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
    local_manifest, local_rows = all_rows(build_dataset(request([str(corpus)], str(tmp_path / "ds"))).url)
    s3_url = build_dataset(request([source], f"s3://{bucket}/datasets", moto_s3.endpoint)).url
    assert s3_url.startswith(f"s3://{bucket}/datasets/")
    s3_manifest, s3_rows = all_rows(s3_url, moto_s3.endpoint)
    s3_sources = s3_manifest.sources(storage(moto_s3.endpoint)).to_pylist()
    local_sources = local_manifest.sources().to_pylist()
    # the same bytes have the same identity (a content hash) wherever they are stored
    assert [(d["key"], d["identity"], d["split"]) for d in s3_sources] == \
        [(d["key"], d["identity"], d["split"]) for d in local_sources]
    # the same layout and stream; the segment's name differs (it is keyed by the documents' URLs)
    assert s3_manifest.stream == local_manifest.stream
    assert [(s.documents, s.train_steps, s.val_steps, s.content) for s in s3_manifest.segments] == \
        [(s.documents, s.train_steps, s.val_steps, s.content) for s in local_manifest.segments]
    assert [dataclasses.replace(split, shards=()) for split in s3_manifest.splits.values()] == \
        [dataclasses.replace(split, shards=()) for split in local_manifest.splits.values()]
    assert s3_rows.keys() == local_rows.keys()
    assert all(np.array_equal(s3_rows[k], local_rows[k]) for k in local_rows)


def test_gzip_sources_read_as_their_text(ray_local, tmp_path, corpus):
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for path in corpus.iterdir():
        (zipped / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    plain = build_dataset(request([str(corpus)], str(tmp_path / "a")))
    packed = build_dataset(request([str(zipped)], str(tmp_path / "b")))
    assert [d["tokens"] for d in packed.sources().to_pylist()] == [d["tokens"] for d in plain.sources().to_pylist()]


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


def encode_listed(sources, root, storage=Store()):
    """The encode task on a listing taken now: what a build does after it lists."""
    from charnn.data.cache import encode_group
    from charnn.data.sources import list_documents

    listing = list_documents(sources, storage)
    return lambda: dict(zip(listing.column("url").to_pylist(),
                            encode_group(listing, str(root), "gorner98", storage).column("error").to_pylist()))


def test_a_source_that_changes_or_vanishes_after_listing_is_an_error(moto_s3, bucket, tmp_path):
    storage = Store(endpoint_url=moto_s3.endpoint)
    client = moto_s3.client()
    for name in ("a.txt", "b.txt", "c.txt"):
        client.put_object(Bucket=bucket, Key=f"corpus/{name}", Body=b"To be, or not to be.\n" * 20)
    encode = encode_listed([f"s3://{bucket}/corpus"], tmp_path / "datasets", storage)
    client.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"Another version.\n" * 20)
    client.delete_object(Bucket=bucket, Key="corpus/b.txt")
    errors = {url.rsplit("/", 1)[-1]: e for url, e in encode().items()}
    assert "changed after the sources were listed" in errors["a.txt"]
    assert "disappeared after the sources were listed" in errors["b.txt"]
    assert errors["c.txt"] is None
    from charnn.data.cache import load_index
    index = load_index(str(tmp_path / "datasets"), "gorner98", storage).to_pylist()
    assert [r["url"].rsplit("/", 1)[-1] for r in index] == ["c.txt"]  # nothing cached under a stale listing


def test_a_local_source_that_changes_after_listing_is_an_error(tmp_path):
    path = tmp_path / "corpus" / "a.txt"
    path.parent.mkdir()
    path.write_text("To be, or not to be.\n" * 20)
    encode = encode_listed([str(path.parent)], tmp_path / "datasets")
    path.write_text("To be, or not to be, that is the question.\n" * 20)
    (error,) = encode().values()
    assert "changed after the sources were listed" in error


def test_many_tiny_objects_on_s3_lay_out_as_local_files_do(ray_local, tmp_path, moto_s3, bucket):
    from test_pipeline import verify_rows

    from support.jobs import write_corpus

    corpus = tmp_path / "many"
    for d in range(3):  # over 1,000 keys: S3 lists them in pages
        write_corpus(corpus / f"part-{d}", documents=400, lines=1, seed=d)
    client = moto_s3.client()
    for path in sorted(corpus.rglob("*.txt")):
        client.put_object(Bucket=bucket, Key=f"many/{path.relative_to(corpus)}", Body=path.read_bytes())
    store = storage(moto_s3.endpoint)
    local = build_dataset(request([str(corpus)], str(tmp_path / "ds")))
    url = build_dataset(request([f"s3://{bucket}/many"], f"s3://{bucket}/datasets", moto_s3.endpoint)).url
    local_by_key = {d["key"]: d["identity"] for d in local.sources().to_pylist()}
    manifest = verify_rows(url, store, read=lambda m, split: np.concatenate([
        encode((corpus / d["key"]).read_bytes()) for d in m.sources(store).to_pylist() if d["split"] == split]))
    assert manifest.documents == 1200
    assert {d["key"]: d["identity"] for d in manifest.sources(store).to_pylist()} == local_by_key
