"""RunStorage: a run's named paths, built once from the spec and handed to the workers (issue 25)."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest

from charnn.spec_loader import spec_from_dict
from charnn.data.cache import cache_url
from charnn.storage import RunStorage, Store, join


def _spec(storage: str, dataset_root: str, **store):
    return spec_from_dict({"data": {"sources": ["corpus:tiny"], "dataset_root": dataset_root},
                           "run": {"name": "exp-1", "storage": storage}, "storage": store})


def test_paths_are_those_the_run_has_always_used():
    spec = _spec("s3://bucket/runs/", "s3://bucket/datasets", endpoint_url="http://127.0.0.1:9000")
    run = RunStorage.from_spec(spec)
    run_url = join(spec.run.storage, spec.run.name)
    assert run.run_url == run_url == "s3://bucket/runs/exp-1"
    assert run.checkpoint("checkpoint_000010") == run_url + "/checkpoint_000010"
    assert run.metrics == run_url + "/metrics.jsonl"
    assert run.spec_yaml == run_url + "/spec.yaml" and run.loss_png == run_url + "/loss.png"
    assert run.models("shakespeare") == join(spec.run.storage, "models", "shakespeare") == \
        "s3://bucket/runs/models/shakespeare"
    assert run.document_cache("gorner98") == cache_url(spec.data.dataset_root, "gorner98") == \
        "s3://bucket/datasets/documents/v2/gorner98"
    assert run.store == Store.of(spec.storage) and run.store.endpoint_url == "http://127.0.0.1:9000"


def test_local_paths_are_expanded_and_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    run = RunStorage.from_spec(_spec("~/runs", "datasets"))
    assert run.root == str(tmp_path / "runs") and run.run_url == str(tmp_path / "runs" / "exp-1")
    assert run.dataset_root == str(tmp_path / "datasets")
    assert run.document_cache("gorner98") == os.path.join(str(tmp_path), "datasets", "documents", "v2", "gorner98")


def test_it_travels_to_the_workers_whole():
    run = RunStorage.from_spec(_spec("gs://bucket/runs", "gs://bucket/ds", anon=True, max_attempts=3))
    back = pickle.loads(pickle.dumps(run))
    assert back == run and back.store.anon and back.store.max_attempts == 3
    assert back.checkpoint("c") == "gs://bucket/runs/exp-1/c"


def test_a_store_lists_reads_and_removes_without_its_filesystem(tmp_path):
    store, root = Store(), str(tmp_path / "r")
    store.write(join(root, "b.json"), b'{"k": 1}')
    store.write(join(root, "a", "x.bin"), b"12345")
    assert store.list(root) == ["b.json"] and store.list(root, dirs=True) == ["a"]
    assert store.list(root, dirs=None) == ["a", "b.json"] and store.names(root, directories=True) == ["a"]
    assert [e["type"] for e in store.list(root, dirs=None, detail=True)] == ["directory", "file"]
    assert store.list(join(root, "missing")) == [] and store.find(join(root, "missing")) == {}
    assert sorted(store.find(root)) == [store.path(join(root, "a", "x.bin")), store.path(join(root, "b.json"))]
    assert store.read_json(join(root, "b.json")) == {"k": 1} and store.size(join(root, "a", "x.bin")) == 5
    with store.open(join(root, "a", "x.bin")) as f:
        assert f.read(2) == b"12"
    assert store.local_path(join(root, "b.json")) == str(tmp_path / "r" / "b.json")
    assert Store().local_path("s3://bucket/key") is None
    store.remove([join(root, "b.json"), join(root, "a")], recursive=True)
    assert store.list(root, dirs=None) == []


def test_a_store_writes_conditionally(tmp_path):
    store, url, lock = Store(), str(tmp_path / "pointer"), str(tmp_path / ".lock")
    tag = store.create(url, b"one")
    with pytest.raises(FileExistsError):
        store.create(url, b"two")
    assert store.read_tagged(url)[:2] == (b"one", tag)
    assert store.replace_if_match(url, b"three", "stale", lock) is None
    assert store.replace_if_match(url, b"three", tag, lock) and store.read(url) == b"three"


def test_a_walk_names_every_file_below_a_root_or_a_glob(tmp_path):
    for name in ("a.txt", "sub/b.txt", "sub/c.md"):
        Store().write(str(tmp_path / "c" / name), b"x")
    found = []
    Store().walk(f"file://{tmp_path}/c", lambda url, key, info: found.append((key, info["size"])))
    assert sorted(found) == [("a.txt", 1), ("sub/b.txt", 1), ("sub/c.md", 1)]
    found.clear()
    Store().walk(f"file://{tmp_path}/c/*/*.txt", lambda url, key, info: found.append((url, key)))
    assert found == [(f"{tmp_path}/c/sub/b.txt", "sub/b.txt")]


def test_it_travels_in_a_trainer_config_as_json():
    run = RunStorage.from_spec(_spec("s3://bucket/runs", "s3://bucket/datasets", endpoint_url="http://127.0.0.1:9000",
                                     region="eu-west-1", anon=True, max_attempts=3))
    values = json.loads(json.dumps(run.to_dict()))  # Ray records train_loop_config as JSON
    assert values == dataclasses.asdict(run)  # the dict the workers were handed before
    assert RunStorage.from_dict(values) == run


def test_a_store_moves_a_file_and_puts_a_directory(tmp_path):
    store = Store()
    store.write(str(tmp_path / "a" / "snapshot.json"), b"{}")
    store.move(str(tmp_path / "a" / "snapshot.json"), str(tmp_path / "a" / "snapshot.json.unusable-1"))
    assert store.names(str(tmp_path / "a")) == ["snapshot.json.unusable-1"]
    (tmp_path / "local" / "inner").mkdir(parents=True)
    (tmp_path / "local" / "events.1").write_bytes(b"one")
    (tmp_path / "local" / "inner" / "events.2").write_bytes(b"two")
    store.write(str(tmp_path / "up" / "tensorboard" / "old"), b"kept")
    for _ in range(2):  # again: into what is there, not into a copy of the directory below it
        store.put(str(tmp_path / "local"), f"file://{tmp_path}/up/tensorboard")
    found = sorted(str(p.relative_to(tmp_path / "up")) for p in (tmp_path / "up").rglob("*") if p.is_file())
    assert found == ["tensorboard/events.1", "tensorboard/inner/events.2", "tensorboard/old"]
