"""The model registry and its lease, on local files and on moto's S3 server; the retrain rules."""
from __future__ import annotations

import json
import time

import pytest
import torch

from jobs.retrain import changed_documents, is_better
from jobs.spec import StorageConfig
from train.checkpoint import load_model
from train.model import CharGRU, ModelShape
from train.registry import ModelRegistry, RegistryBusy, RegistryError


def test_changed_documents_sees_new_changed_and_removed():
    published = {"a": "etag:1", "b": "etag:2", "c": "etag:3"}
    current = {"a": "etag:1", "b": "etag:9", "d": "etag:4"}
    assert changed_documents(current, published) == (["b", "d"], ["c"])
    assert changed_documents(published, published) == ([], [])
    assert changed_documents(current, {}) == (["a", "b", "d"], [])


def test_is_better_applies_min_improvement():
    assert is_better(1.0, None, 5.0)  # nothing published: any candidate
    assert is_better(1.0, 1.2, 0.1) and not is_better(1.15, 1.2, 0.1)
    assert not is_better(1.2, 1.2, 0.0)  # a tie keeps the incumbent


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path) -> ModelRegistry:
    if request.param == "local":
        return ModelRegistry(str(tmp_path / "models" / "m"))
    moto = request.getfixturevalue("moto_s3")
    name = f"charnn-registry-{time.time_ns()}"
    moto.client().create_bucket(Bucket=name)
    return ModelRegistry(f"s3://{name}/runs/models/m", StorageConfig(endpoint_url=moto.endpoint))


def _checkpoint(tmp_path, seed: int) -> str:
    torch.manual_seed(seed)
    model = CharGRU(ModelShape(98, 8, 1))
    directory = tmp_path / f"ckpt-{seed}"
    directory.mkdir()
    torch.save({"format": "charnn.checkpoint/1", "model": model.state_dict(), "shape": model.shape.to_dict(),
                "alphabet": "gorner98"}, directory / "model.pt")
    return str(directory)


def put(registry: ModelRegistry, relative: str, data: bytes) -> None:
    """Write an object into the registry behind its back (another writer, or damage)."""
    path = f"{registry.path}/{relative}"
    registry.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    registry.fs.pipe_file(path, data)


def test_publish_moves_the_pointer_to_a_complete_version(registry, tmp_path):
    assert registry.published() is None
    with registry.lease(60) as lease:
        first = registry.publish(_checkpoint(tmp_path, 1), {"dataset": {"sources": [{"url": "u", "identity": "i"}]}}, lease)
        second = registry.publish(_checkpoint(tmp_path, 2), {"dataset": {"sources": []}}, lease)
    assert (first.name, second.name) == ("v0001", "v0002")
    published = registry.published()
    assert published.name == "v0002" and published.info["version"] == "v0002"
    assert registry.version("v0001").sources == {"u": "i"}
    model, _ = load_model(published.url, registry.storage)
    torch.manual_seed(2)
    assert torch.equal(model.head.weight, CharGRU(ModelShape(98, 8, 1)).head.weight)


def test_versions_are_immutable_and_half_written_ones_are_skipped(registry, tmp_path):
    put(registry, "versions/v0001/model.pt", b"x")  # a writer killed before version.json
    with registry.lease(60) as lease:
        assert registry.publish(_checkpoint(tmp_path, 1), {"dataset": {"sources": []}}, lease).name == "v0002"
        registry.versions = lambda: []  # a writer that listed before v0001 and v0002 existed
        with pytest.raises(RegistryBusy, match="versions/v0001 appeared while this job wrote it"):
            registry.publish(_checkpoint(tmp_path, 2), {"dataset": {"sources": []}}, lease)
    assert registry.fs.cat_file(f"{registry.path}/versions/v0001/model.pt") == b"x"
    assert registry.published().name == "v0002"


def test_second_writer_is_refused_while_the_first_holds_the_lease(registry):
    first = registry.lease(60)
    first.acquire()
    with pytest.raises(RegistryBusy, match="another retrain holds the lease"):
        registry.lease(60).acquire()
    first.release()
    with registry.lease(60):  # released: the next writer gets it
        pass


def test_an_expired_lease_is_taken_over_and_its_holder_cannot_publish(registry, tmp_path):
    dead = registry.lease(0.5)
    dead.acquire()
    dead._stop.set()  # a writer that died: no more renewals
    time.sleep(0.8)
    with registry.lease(60):
        with pytest.raises(RegistryBusy, match="lost the lease"):
            registry.publish(_checkpoint(tmp_path, 1), {"dataset": {"sources": []}}, dead)
    assert registry.published() is None


def test_a_racing_writer_loses_the_create_only_write(registry):
    racer = registry.lease(60)
    put(registry, "lease/000001.json", json.dumps({"owner": "other", "expires": 0, "released": True}).encode())
    real_numbers = racer._numbers
    racer._numbers = lambda: []  # it listed before the other writer created lease 1
    with pytest.raises(RegistryBusy, match="took its lease just now"):
        racer.acquire()
    racer._numbers = real_numbers


def test_pointer_to_a_missing_version_is_a_clear_error(registry):
    put(registry, "published.json", json.dumps({"version": "v0007"}).encode())
    with pytest.raises(RegistryError, match="names version v0007, which has no version.json"):
        registry.published()
    put(registry, "published.json", b"{not json")
    with pytest.raises(RegistryError, match="is not valid JSON"):
        registry.published()
