"""version.json and the record of a rejected candidate as a typed record (``VersionInfo``): it reads
the files written before it existed (keys missing or of another type read as None) and writes them
byte for byte as before (captured from that code, ``ModelRegistry.publish``/``reject`` given dicts),
so registries written by either age stay readable by both.  Also the checkpoint checksums files."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from charnn.checkpoint import Checksums, save_checksums
from charnn.registry import DatasetInfo, ModelRegistry, RegistryError, VersionInfo
from charnn.storage import Store

# Written by the code before the record, given these values (published_at 1700000200.5).
VERSION_BYTES = (
    b'{\n "metrics": {\n  "val_loss": 1.5,\n  "val_accuracy": 0.5,\n  "val_bpc": 2.1640425613334453\n'
    b' },\n "incumbent": {\n  "version": "v0001",\n  "val_loss": 1.75,\n  "val_accuracy": 0.25,\n  "v'
    b'al_bpc": 2.5\n },\n "candidate": "file:///r/candidates/c1/checkpoint_000001",\n "spec": {\n  "'
    b'run": {\n   "name": "c1"\n  },\n  "train": {\n   "steps": 5\n  }\n },\n "dataset": {\n  "url": "fi'
    b'le:///r/datasets/d/versions/v000002",\n  "documents": 7\n },\n "version": "v0001",\n "publishe'
    b'd_at": 1700000200.5\n}')
FIRST_VERSION_BYTES = (
    b'{\n "metrics": {\n  "val_loss": 1.5,\n  "val_accuracy": 0.5,\n  "val_bpc": 2.1640425613334453\n'
    b' },\n "incumbent": null,\n "candidate": "file:///r/candidates/c1/checkpoint_000001",\n "spec"'
    b': {\n  "run": {\n   "name": "c1"\n  },\n  "train": {\n   "steps": 5\n  }\n },\n "dataset": {\n  "ur'
    b'l": "file:///r/datasets/d/versions/v000002",\n  "documents": 7\n },\n "version": "v0002",\n "p'
    b'ublished_at": 1700000200.5\n}')
REJECTED_BYTES = (
    b'{\n "metrics": {\n  "val_loss": 1.5,\n  "val_accuracy": 0.5,\n  "val_bpc": 2.1640425613334453\n'
    b' },\n "incumbent": {\n  "version": "v0001",\n  "val_loss": 1.75,\n  "val_accuracy": 0.25,\n  "v'
    b'al_bpc": 2.5\n },\n "candidate": "file:///r/candidates/c1/checkpoint_000001",\n "spec": {\n  "'
    b'run": {\n   "name": "c1"\n  },\n  "train": {\n   "steps": 5\n  }\n },\n "dataset": {\n  "url": "fi'
    b'le:///r/datasets/d/versions/v000002",\n  "documents": 7\n },\n "reason": "it must gain 0.01 o'
    b'n the incumbent"\n}')

METRICS = {"val_loss": 1.5, "val_accuracy": 0.5, "val_bpc": 2.1640425613334453}
INCUMBENT = {"version": "v0001", "val_loss": 1.75, "val_accuracy": 0.25, "val_bpc": 2.5}
CANDIDATE = VersionInfo(METRICS, INCUMBENT, "file:///r/candidates/c1/checkpoint_000001",
                        {"run": {"name": "c1"}, "train": {"steps": 5}},
                        DatasetInfo("file:///r/datasets/d/versions/v000002", 7))


def test_a_version_reads_and_writes_the_format_written_before_it():
    published = dataclasses.replace(CANDIDATE, version="v0001", published_at=1700000200.5)
    assert VersionInfo.from_json(VERSION_BYTES, "version.json") == published
    assert published.to_json() == VERSION_BYTES and published.val_loss == 1.5
    first = dataclasses.replace(published, incumbent=None, version="v0002")
    assert first.to_json() == FIRST_VERSION_BYTES  # a candidate names its incumbent, null when there was none
    assert VersionInfo.from_json(FIRST_VERSION_BYTES, "version.json") == first


def test_a_rejected_record_reads_and_writes_the_format_written_before_it():
    rejected = dataclasses.replace(CANDIDATE, reason="it must gain 0.01 on the incumbent")
    assert rejected.to_json() == REJECTED_BYTES
    assert VersionInfo.from_json(REJECTED_BYTES, "c2.json") == rejected


@pytest.mark.parametrize("data", [b'{"dataset": {"sources": []}}', b'{"dataset": {"documents": 5000}}',
                                  b'{"version": "v0001", "published_at": 1.5}', b"{}"])
def test_an_older_version_round_trips_with_the_same_keys(data):
    info = VersionInfo.from_json(data, "version.json")
    assert info.to_json() == json.dumps(json.loads(data), indent=1).encode()


def test_what_a_version_lacks_or_has_of_another_type_reads_as_none():
    info = VersionInfo.from_json(b'{"metrics": 3, "dataset": {"url": 7, "sources": "x"}, "published_at": "now"}', "v")
    assert (info.metrics, info.val_loss, info.published_at, info.dataset) == (None, None, None, DatasetInfo())
    assert VersionInfo.from_json(b"[1, 2]", "v") == VersionInfo()
    with pytest.raises(RegistryError, match="is not valid JSON"):
        VersionInfo.from_json(b"{torn", "v")


def test_publish_and_reject_write_the_record(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.pt").write_bytes(b"weights")
    registry = ModelRegistry(str(tmp_path / "models" / "m"), Store())
    with registry.lease(60) as lease:
        version = registry.publish(str(tmp_path / "ck"), CANDIDATE, lease, replaces=None)
        url = registry.reject("c2", dataclasses.replace(CANDIDATE, reason="why"), lease)
    read = registry.version("v0001").info
    assert read == version.info and (read.version, read.dataset.documents, read.reason) == ("v0001", 7, None)
    assert VersionInfo.from_json(registry.store.read(url), url).reason == "why"


# Written by save_checksums before the record: json.dump of {"world": ..., "files": ...}.
CHECKSUMS_BYTES = b'{"world": 2, "files": {"model.pt": "ab12", "rng-rank0000.pt": "cd34"}}'


def test_a_checksums_file_reads_and_writes_the_format_written_before_it(tmp_path):
    checksums = Checksums.from_json(CHECKSUMS_BYTES)
    assert checksums == Checksums(2, {"model.pt": "ab12", "rng-rank0000.pt": "cd34"})
    assert checksums.to_json() == CHECKSUMS_BYTES
    (tmp_path / "model.pt").write_bytes(b"weights")
    save_checksums(str(tmp_path), 1, 2)
    written = (tmp_path / "checksums-rank0001.json").read_bytes()
    digest = hashlib.sha256(b"weights").hexdigest()
    assert written == json.dumps({"world": 2, "files": {"model.pt": digest}}).encode()
    assert Checksums.from_json(written).files == {"model.pt": digest}
