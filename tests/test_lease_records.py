"""The lease record and the registry pointer as typed records: they read the files written before
they existed, and write them byte for byte as before (captured from that code), so holders and
readers of either age share a registry.  Also the Lease's explicit states."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from charnn.lease import LeaseRecord, LeaseState
from charnn.registry import ModelRegistry, Pointer, RegistryBusy, RegistryError, VersionInfo
from charnn.storage import Store

# Written by the code before the records (Lease._body, ModelRegistry._move_pointer), given these values.
PROCESS = {"boot": "b-1", "pidns": "pid:[4026531836]", "pid": 4242}
LEASE_BYTES = (b'{"owner": "host:7:abcdef12", "expires": 1700000060.5, "released": false, "acquired": 1700000000.25, '
               b'"process": {"boot": "b-1", "pidns": "pid:[4026531836]", "pid": 4242}}')
RELEASED_BYTES = (b'{"owner": "host:7:abcdef12", "expires": 0.0, "released": true, "acquired": 1700000000.25, '
                  b'"process": {"boot": "b-1", "pidns": "pid:[4026531836]", "pid": 4242}}')
POINTER_BYTES = b'{"version": "v0002", "fence": 3, "owner": "host:7:abcdef12", "published_at": 1700000100.75}'


def test_a_lease_record_reads_and_writes_the_format_written_before_it():
    record = LeaseRecord.from_json(LEASE_BYTES)
    assert record == LeaseRecord("host:7:abcdef12", 1700000060.5, False, 1700000000.25, PROCESS, format=1)
    assert record.to_json() == LEASE_BYTES
    released = dataclasses.replace(record, expires=0.0, released=True)
    assert released.to_json() == RELEASED_BYTES and LeaseRecord.from_json(RELEASED_BYTES) == released


def test_a_lease_record_from_before_acquired_and_process_round_trips_with_the_same_keys():
    old = b'{"owner": "other", "expires": 0, "released": true}'
    record = LeaseRecord.from_json(old)
    assert (record.acquired, record.process, record.format) == (None, None, 1)
    assert record.ended(time.time()) and record.to_json() == old


@pytest.mark.parametrize("data", [b"", b"{torn", b"[]", b'{"owner": "x"}', b'{"owner": "x", "expires": "soon"}',
                                  b'{"owner": "x", "expires": 1e12, "released": false, "format": 2}'])
def test_what_is_not_a_lease_record_of_a_known_format_reads_as_none(data):
    assert LeaseRecord.from_json(data) is None  # the lease then treats it as torn: live until its file is old


def test_a_pointer_reads_and_writes_the_format_written_before_it():
    pointer = Pointer.from_json(POINTER_BYTES, "published.json")
    assert pointer == Pointer("v0002", 3, "host:7:abcdef12", 1700000100.75, format=1)
    assert pointer.to_json() == POINTER_BYTES and pointer.lease_number == 3


def test_a_pointer_from_before_fences_round_trips_with_the_same_keys():
    old = b'{"version": "v0001"}'
    pointer = Pointer.from_json(old, "published.json")
    assert (pointer.fence, pointer.lease_number, pointer.owner) == (None, 0, None)
    assert pointer.to_json() == old
    assert Pointer.from_json(b"[1]", "published.json").version is None  # names no version: refused by name


@pytest.mark.parametrize("data, message", [(b"{not json", "is not valid JSON"),
                                           (b'{"version": "v0001", "format": 2}', "has format 2, newer than"),
                                           (b'{"version": "v0001", "fence": "three"}', "not a lease number")])
def test_a_pointer_that_cannot_be_read_is_a_clear_error(data, message):
    with pytest.raises(RegistryError, match=message):
        Pointer.from_json(data, "published.json")


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(str(tmp_path / "models" / "m"), Store())


def _checkpoint(tmp_path) -> str:
    (tmp_path / "ck").mkdir(exist_ok=True)
    (tmp_path / "ck" / "model.pt").write_bytes(b"weights")
    return str(tmp_path / "ck")


def test_the_files_a_lease_and_a_publish_write_keep_their_keys_in_order(registry, tmp_path):
    with registry.lease(60) as lease:
        written = json.loads(registry.fs.cat_file(registry.record_path(lease.number)))
        assert list(written) == ["owner", "expires", "released", "acquired", "process"]
        assert LeaseRecord.from_json(json.dumps(written).encode()).owner == lease.owner
        registry.publish(_checkpoint(tmp_path), VersionInfo(), lease, replaces=None)
    pointer = json.loads(registry.fs.cat_file(f"{registry.path}/published.json"))
    assert list(pointer) == ["version", "fence", "owner", "published_at"]
    assert (pointer["version"], pointer["fence"], pointer["owner"]) == ("v0001", lease.number, lease.owner)


def test_a_pointer_of_a_newer_format_is_refused_not_misread(registry):
    registry.fs.makedirs(registry.path, exist_ok=True)
    registry.fs.pipe_file(f"{registry.path}/published.json", b'{"version": "v0001", "format": 2}')
    with pytest.raises(RegistryError, match="newer than this charnn reads"):
        registry.published()


def test_a_lease_record_of_a_newer_format_is_not_taken_over_before_it_is_old(registry):
    registry.fs.makedirs(f"{registry.path}/lease", exist_ok=True)
    registry.fs.pipe_file(registry.record_path(1), b'{"owner": "x", "expires": 0, "released": true, "format": 2}')
    with pytest.raises(RegistryBusy, match="an unreadable record"):
        registry.lease(60).acquire()


def test_a_lease_goes_from_new_to_held_to_released_or_lost(registry):
    lease = registry.lease(60)
    assert lease.state is LeaseState.NEW
    with pytest.raises(RegistryBusy, match="it was never taken"):
        lease.check()
    with lease:
        assert lease.state is LeaseState.HELD
        lease.check()
    assert lease.state is LeaseState.RELEASED
    with pytest.raises(RegistryBusy, match="this job released it"):
        lease.check()
    assert LeaseRecord.from_json(registry.fs.cat_file(registry.record_path(lease.number))).released

    lost = registry.lease(60)
    lost.acquire()
    other = LeaseRecord("another-host:1:x", time.time() + 600).to_json()
    registry.fs.pipe_file(registry.record_path(lost.number), other)
    assert not lost._renew_once()
    assert lost.state is LeaseState.LOST and "replaced or removed" in lost.lost_reason
    lost.release()  # a lost lease stays lost, and its successor's record is left alone
    assert lost.state is LeaseState.LOST
    assert registry.fs.cat_file(registry.record_path(lost.number)) == other
    with pytest.raises(RegistryBusy, match="replaced or removed"):
        lost.check()


def test_reject_needs_the_lease_it_is_given(registry):
    with registry.lease(60) as lease:
        registry.reject("first", VersionInfo(reason="test"), lease)
    with pytest.raises(RegistryBusy, match="this job released it"):
        registry.reject("second", VersionInfo(reason="test"), lease)
    assert registry.store.names(f"{registry.url}/rejected") == ["first.json"]
