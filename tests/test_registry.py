"""The model registry and its lease, on local files and on moto's S3 server; the retrain rules.

The concurrency tests run their writers in real processes (spawned, released together by a
barrier), round after round, on a local disk and on moto's S3 server.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import urllib.parse
from concurrent.futures import ProcessPoolExecutor

import fsspec
import pytest
import torch

from charnn.storage import Store
from charnn.checkpoint import load_model
from charnn.model import CharGRU, ModelShape
from charnn.registry import DatasetInfo, ModelRegistry, RegistryBusy, RegistryError, VersionInfo
from charnn.storage import create_exclusive as _create, url_key


def test_changed_documents_sees_new_changed_and_removed():
    from charnn.cli.retrain import changed_documents  # imported here: spawned test workers need not load jobs/

    published = {"a": "etag:1", "b": "etag:2", "c": "etag:3"}
    current = {"a": "etag:1", "b": "etag:9", "d": "etag:4"}
    assert changed_documents(current, published) == (["b", "d"], ["c"])
    assert changed_documents(published, published) == ([], [])
    assert changed_documents(current, {}) == (["a", "b", "d"], [])
    assert changed_documents({"a": None, "b": "etag:2"}, {"b": "etag:2"}) == (["a"], [])  # not in the cache yet
    assert changed_documents({"a": None}, {}) == (["a"], [])


def test_is_better_applies_min_improvement():
    from charnn.cli.retrain import is_better

    assert is_better(1.0, None, 5.0)  # nothing published: any candidate
    assert is_better(1.0, 1.2, 0.1) and not is_better(1.15, 1.2, 0.1)
    assert not is_better(1.2, 1.2, 0.0)  # a tie keeps the incumbent


def test_a_diverged_or_useless_candidate_is_never_published_and_a_nan_incumbent_never_blocks():
    """N-3: a candidate whose loss is not finite, or no better than knowing nothing (ln 98 = 4.58),
    is rejected even with nothing published; an incumbent whose loss is NaN is beaten by any sane one."""
    import math

    from charnn.cli.retrain import is_better, rejection, worse_than_uniform

    floor = worse_than_uniform("gorner98")
    assert floor == pytest.approx(math.log(98))
    for diverged in (math.nan, math.inf, 1.8e6, floor):
        assert not is_better(diverged, None, 0.0, floor), diverged
    assert "not finite" in rejection(math.nan, None, 0.0, floor)
    assert "knows nothing" in rejection(1.8e6, None, 0.0, floor)
    for candidate in (0.5, 1.0, 3.0):
        assert is_better(candidate, math.nan, 0.0, floor) and is_better(candidate, math.inf, 0.5, floor)
    assert not is_better(math.nan, math.nan, 0.0, floor)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.ray)])  # s3: moto's server, the slow tier
def registry(request, tmp_path) -> ModelRegistry:
    if request.param == "local":
        return ModelRegistry(str(tmp_path / "models" / "m"), Store())
    moto = request.getfixturevalue("moto_s3")
    name = f"charnn-registry-{time.time_ns()}"
    moto.client().create_bucket(Bucket=name)
    return ModelRegistry(f"s3://{name}/runs/models/m", Store(endpoint_url=moto.endpoint))


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
        listed = VersionInfo(dataset=DatasetInfo(sources=[{"url": "u", "identity": "i"}]))
        first = registry.publish(_checkpoint(tmp_path, 1), listed, lease,
                                 replaces=None)
        second = registry.publish(_checkpoint(tmp_path, 2), INFO, lease,
                                  replaces=registry.published())
    assert (first.name, second.name) == ("v0001", "v0002")
    published = registry.published()
    assert published.name == "v0002" and published.info.version == "v0002"
    assert registry.version("v0001").sources() == {url_key("u"): "i"}  # a version of before sources.parquet
    model, _ = load_model(published.url, registry.store)
    torch.manual_seed(2)
    assert torch.equal(model.head.weight, CharGRU(ModelShape(98, 8, 1)).head.weight)


def test_a_version_keeps_its_documents_in_a_table_of_its_own(registry, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": [f"s3://b/doc-{i}.txt" for i in range(5000)], "identity": [f"sha256:{i}" for i in range(5000)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    with registry.lease(60) as lease:
        registry.publish(_checkpoint(tmp_path, 1), VersionInfo(dataset=DatasetInfo(documents=5000)), lease,
                         replaces=None,
                         files={"sources.parquet": buffer.getvalue()})
    version = registry.published()
    assert len(version.sources()) == 5000 and version.sources()[url_key("s3://b/doc-7.txt")] == "sha256:7"
    assert len(registry.fs.cat_file(f"{registry.path}/versions/v0001/version.json")) < 1000


def test_versions_are_immutable_and_half_written_ones_are_skipped(registry, tmp_path):
    put(registry, "versions/v0001/model.pt", b"x")  # a writer killed before version.json
    with registry.lease(60) as lease:
        assert registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None).name == "v0002"
        registry.versions = lambda: []  # a writer that listed before v0001 and v0002 existed
        with pytest.raises(RegistryBusy, match="versions/v0001 appeared while this job wrote it"):
            registry.publish(_checkpoint(tmp_path, 2), INFO, lease, replaces=registry.published())
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
            registry.publish(_checkpoint(tmp_path, 1), INFO, dead, replaces=None)
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


# ---------------------------------------------------------------------------------------------
# Helpers for the tests below.

INFO = VersionInfo(dataset=DatasetInfo(sources=[]))


def record(registry: ModelRegistry, number: int) -> dict:
    return json.loads(registry.fs.cat_file(f"{registry.path}/lease/{number:06d}.json"))


def expire(registry: ModelRegistry, number: int) -> None:
    """The holder of lease ``number`` stalled past its expiry (written behind its back)."""
    put(registry, f"lease/{number:06d}.json", json.dumps({**record(registry, number), "expires": 0.0}).encode())


def take_over(registry: ModelRegistry, number: int) -> None:
    """Another writer's live record replaces lease ``number`` (written behind the holder's back)."""
    put(registry, f"lease/{number:06d}.json",
        json.dumps({"owner": "another-host:1:takeover", "expires": time.time() + 600, "released": False}).encode())


def wipe(registry: ModelRegistry, relative: str) -> None:
    """Delete a registry directory, as an operator would; retried while a holder writes into it."""
    path = f"{registry.path}/{relative}"
    for _ in range(50):
        try:
            registry.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError:  # a renewal's temporary file appeared while the tree was removed
            continue
        registry.fs.invalidate_cache()
        if not registry.fs.exists(path):
            return
    raise AssertionError(f"could not delete {path}")


def pointer(registry: ModelRegistry) -> dict:
    return json.loads(registry.fs.cat_file(f"{registry.path}/published.json"))


def open_registry(url: str, endpoint: str | None) -> ModelRegistry:
    return ModelRegistry(url, Store(endpoint_url=endpoint))


def endpoint_of(registry: ModelRegistry) -> str | None:
    return registry.store.endpoint_url


# ---------------------------------------------------------------------------------------------
# Real concurrent processes: a pool of two spawned workers that share a barrier.

BARRIER_TIMEOUT = 120
_BARRIER = None  # in a worker: the barrier shared with the other worker


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _meet() -> None:
    _BARRIER.wait(BARRIER_TIMEOUT)


def _in_worker(scenario, *args):
    """Run a scenario in a worker; a failure breaks the barrier so the other worker fails at once."""
    try:
        return scenario(*args)
    except BaseException:
        _BARRIER.abort()
        raise


class Pair:
    def __init__(self, pool: ProcessPoolExecutor, barrier):
        self.pool, self.barrier = pool, barrier

    def run(self, scenario, *args_per_worker: tuple) -> list:
        """``scenario(*args)`` in both workers at once; their results, in the order given."""
        self.barrier.reset()
        futures = [self.pool.submit(_in_worker, scenario, *args) for args in args_per_worker]
        errors = [f.exception(timeout=600) for f in futures]
        for error in sorted(filter(None, errors), key=lambda e: isinstance(e, threading.BrokenBarrierError)):
            raise error  # the first real failure, not the other worker's broken barrier
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def two_processes():
    context = multiprocessing.get_context("spawn")  # no inherited threads or locks: two real, separate writers
    barrier = context.Barrier(2)
    with ProcessPoolExecutor(2, mp_context=context, initializer=_init_worker, initargs=(barrier,)) as pool:
        yield Pair(pool, barrier)


def _race_for_a_lease(url: str, endpoint: str | None, rounds: int, me: str) -> list[tuple[bool, bool]]:
    """Each round both workers take a fresh registry's lease, then create the same version file, at once."""
    outcomes = []
    for r in range(rounds):
        registry = open_registry(f"{url}/race-{r:03d}", endpoint)
        lease = registry.lease(60)
        _meet()
        try:
            lease.acquire()
            took = True
        except RegistryBusy:
            took = False
        created = []
        for v in range(1, 6):
            _meet()
            try:
                _create(registry.fs, f"{registry.path}/versions/v{v:04d}/model.pt", me.encode())
                created.append(True)
            except FileExistsError:
                created.append(False)
        _meet()  # both tried before the winner lets go
        if took:
            lease.release()
        outcomes.append((took, created))
    return outcomes


def test_racing_writers_take_each_lease_and_each_version_file_once(registry, two_processes):
    """F-1: of two processes that create the same lease record or version file at once, exactly one wins."""
    rounds = 40
    a, b = two_processes.run(_race_for_a_lease, (registry.url, endpoint_of(registry), rounds, "a"),
                             (registry.url, endpoint_of(registry), rounds, "b"))
    both_took = [r for r in range(rounds) if a[r][0] and b[r][0]]
    both_created = [(r, v) for r in range(rounds) for v, (x, y) in enumerate(zip(a[r][1], b[r][1])) if x and y]
    assert not both_took and not both_created, f"both won the lease in rounds {both_took}, both created model.pt in {both_created}"
    assert all(a[r][0] != b[r][0] for r in range(rounds)), "a round in which nobody took the lease"
    assert all(x != y for r in range(rounds) for x, y in zip(a[r][1], b[r][1])), "a version file nobody created"


def _check_passes(lease) -> bool:
    try:
        lease.check()
        return True
    except RegistryBusy:
        return False


def _holder_and_operator(url: str, endpoint: str | None, rounds: int, role: str) -> list[list[bool]]:
    """Each round: the holder takes the lease and renews it every 0.1 s; the operator deletes lease/
    (what the old busy message advised) and takes the lease; then both keep checking it."""
    seen = []
    for r in range(rounds):
        registry = open_registry(f"{url}/wipe-{r:03d}", endpoint)
        if role == "holder":
            lease = registry.lease(0.3)
            lease.acquire()
        _meet()  # the holder holds and renews
        if role == "operator":
            wipe(registry, "lease")
            lease = registry.lease(60)
            lease.acquire()
        _meet()  # both now believe they may write
        passes = []
        for _ in range(10):
            passes.append(_check_passes(lease))
            time.sleep(0.05)  # room for the holder's renewals
        _meet()
        lease.release()
        seen.append(passes)
    return seen


def test_a_holder_whose_lease_records_were_deleted_never_takes_the_new_lease_back(registry, two_processes):
    """F-2: after lease/ is deleted and another writer takes the lease, the old holder's renewals must
    not overwrite the new record: the new holder keeps the lease, the old one has lost it for good."""
    rounds = 5
    holder, operator = two_processes.run(_holder_and_operator, (registry.url, endpoint_of(registry), rounds, "holder"),
                                         (registry.url, endpoint_of(registry), rounds, "operator"))
    assert holder == [[False] * 10] * rounds, f"the old holder passed check(): {holder}"
    assert operator == [[True] * 10] * rounds, f"the new holder failed check(): {operator}"


def _stall_after(check, waits: int, on_call: int = 2):
    """A lease.check() that passes, then, on its ``on_call``-th call (publish() checks before it picks a
    version name and again just before the pointer moves), stalls the job (a GC pause, SIGSTOP, a
    partition) for ``waits`` meetings."""
    calls = []

    def stalled():
        check()
        calls.append(1)
        if len(calls) == on_call:
            for _ in range(waits):
                _meet()
    return stalled


def _publish_outcome(registry, checkpoint, lease, replaces) -> str:
    try:
        return registry.publish(checkpoint, INFO, lease, replaces=replaces).name
    except RegistryBusy:
        return "busy"


def _publish_during_a_stall(url: str, endpoint: str | None, checkpoint: str, rounds: int, role: str) -> list:
    """Each round: v0001 is published; the stalled writer A writes v0002 and passes check(), then stalls;
    its lease runs out and B takes the lease. Even rounds: B publishes v0003, then A resumes. Odd
    rounds: B too passes check(), and both move the pointer at once."""
    outcomes = []
    for r in range(rounds):
        registry = open_registry(f"{url}/stall-{r:03d}", endpoint)
        racing = r % 2 == 1
        if role == "stalled":
            with registry.lease(60) as lease:
                registry.publish(checkpoint, INFO, lease, replaces=None)
            lease = registry.lease(60)
            lease.acquire()
            lease.check = _stall_after(lease.check, waits=2)
        _meet()
        if role == "stalled":
            outcome = _publish_outcome(registry, checkpoint, lease, registry.published())
        else:
            _meet()  # A passed check() and stalled
            expire(registry, 2)
            lease = registry.lease(60)
            lease.acquire()
            if racing:
                lease.check = _stall_after(lease.check, waits=1)
            outcome = _publish_outcome(registry, checkpoint, lease, registry.published())
            if not racing:
                _meet()  # B has published: A resumes
        _meet()
        outcomes.append((racing, outcome, registry.published().name))
        lease.release()
    return outcomes


def test_a_stalled_writer_never_moves_the_pointer_back_or_over_a_concurrent_one(registry, two_processes, tmp_path):
    """F-3: a writer that passed check() and stalled while another took over must not overwrite the
    newer publication; and of two writers that move the pointer at once, exactly one succeeds."""
    rounds = 6
    checkpoint = _checkpoint(tmp_path, 1)
    args = (registry.url, endpoint_of(registry), checkpoint, rounds)
    stalled, other = two_processes.run(_publish_during_a_stall, (*args, "stalled"), (*args, "other"))
    for (racing, a, published), (_, b, seen_by_b) in zip(stalled, other):
        assert published == seen_by_b
        if not racing:
            assert (a, b, published) == ("busy", "v0003", "v0003"), (a, b, published)
        else:
            assert sorted([a, b]) in (["busy", "v0002"], ["busy", "v0003"]), f"both or neither published: {a}, {b}"
            assert published == (a if a != "busy" else b)


# ---------------------------------------------------------------------------------------------
# One process.

def _stall_in_move_pointer(check, stalled: threading.Event, resume: threading.Event):
    """A lease.check() that stalls the job right after the check just before the pointer moves
    (publish()'s second check; the first comes before it picks a version name)."""
    calls = []

    def check_then_stall():
        check()
        calls.append(1)
        if len(calls) == 2:
            stalled.set()
            resume.wait(60)
    return check_then_stall


def test_a_holder_stalled_after_its_check_cannot_move_the_pointer_back(registry, tmp_path):
    """F-3: A passes check(), stalls; its lease runs out, B takes over and publishes; A resumes."""
    a = registry.lease(60)
    a.acquire()
    stalled, resume = threading.Event(), threading.Event()
    a.check = _stall_in_move_pointer(a.check, stalled, resume)
    result = {}

    def publish_a():
        try:
            result["a"] = registry.publish(_checkpoint(tmp_path, 1), INFO, a, replaces=None).name
        except RegistryBusy as exc:
            result["a"] = exc

    thread = threading.Thread(target=publish_a)
    thread.start()
    assert stalled.wait(60)
    expire(registry, a.number)
    with registry.lease(60) as b:
        assert registry.publish(_checkpoint(tmp_path, 2), INFO, b, replaces=registry.published()).name == "v0002"
    resume.set()
    thread.join(60)
    assert isinstance(result["a"], RegistryBusy), result
    assert registry.published().name == "v0002" and pointer(registry)["fence"] == 2
    a.release()


def test_a_pointer_published_under_a_newer_lease_is_never_replaced(registry, tmp_path):
    """F-3: the pointer carries its writer's lease number; an older lease never replaces it."""
    with registry.lease(60) as lease:
        assert lease.number == 1
        registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None)
        newer = {"version": "v0001", "fence": 7, "owner": "another-host:1:newer"}
        put(registry, "published.json", json.dumps(newer).encode())  # published under lease 7 meanwhile
        with pytest.raises(RegistryBusy, match="lease 7"):
            registry.publish(_checkpoint(tmp_path, 2), INFO, lease, replaces=registry.published())
    assert pointer(registry) == newer


def test_a_pointer_without_a_fence_still_loads_and_is_replaced(registry, tmp_path):
    with registry.lease(60) as lease:
        registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None)
    put(registry, "published.json", json.dumps({"version": "v0001"}).encode())  # written before fences
    assert registry.published().name == "v0001"
    with registry.lease(60) as lease:
        assert lease.number == 2
        assert registry.publish(_checkpoint(tmp_path, 2), INFO, lease, replaces=registry.published()).name == "v0002"
    assert registry.published().name == "v0002" and pointer(registry)["fence"] == 2


def test_lease_numbers_never_repeat_after_the_lease_records_are_deleted(registry, tmp_path):
    """F-2: the next number comes after both the newest record and the fence in published.json."""
    with registry.lease(60) as lease:
        registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None)
    wipe(registry, "lease")
    with registry.lease(60) as lease:
        assert lease.number == 2


def test_a_holder_stops_renewing_a_record_that_is_no_longer_its_own(registry):
    """F-2: renewal is a compare-and-swap: it never overwrites another writer's record."""
    lease = registry.lease(0.3)  # renews every 0.1 s
    lease.acquire()
    take_over(registry, lease.number)
    time.sleep(0.5)  # several renewal rounds
    assert record(registry, lease.number)["owner"] == "another-host:1:takeover"
    with pytest.raises(RegistryBusy, match="lost the lease"):
        lease.check()
    lease.release()
    assert record(registry, 1)["owner"] == "another-host:1:takeover"  # release leaves it alone too


def test_the_busy_message_says_wait_or_release_and_never_delete(registry):
    """F-2: deleting lease/ is what made numbers repeat; the message must not advise it."""
    holder = registry.lease(60)
    holder.acquire()
    with pytest.raises(RegistryBusy) as busy:
        registry.lease(60).acquire()
    message = str(busy.value)
    assert "another retrain holds the lease" in message and "delete" not in message
    assert "lease/000001.json" in message and '"released": true' in message
    holder.release()


def test_an_unreadable_lease_record_blocks_only_until_it_would_have_expired(registry):
    """F-13: an empty record (a writer killed between creating and writing it) expires like any other."""
    put(registry, "lease/000001.json", b"")
    with pytest.raises(RegistryBusy, match="another retrain holds the lease"):
        registry.lease(3).acquire()  # S3 times are whole seconds: at least 2 s of it are left
    time.sleep(3.2)  # past its modification time plus the lease length
    with registry.lease(3) as lease:
        assert lease.number == 2


def test_a_lease_is_not_held_past_its_maximum(registry):
    """F-15: a stuck job stops renewing after max_hold_s, so its lease expires and check() fails."""
    stuck = registry.lease(0.6, max_hold_s=0.3)  # renews every 0.2 s
    stuck.acquire()
    time.sleep(1.2)  # past max_hold_s plus the lease length: the last renewal was before max_hold_s
    with pytest.raises(RegistryBusy, match="max_hold_s"):
        stuck.check()
    with registry.lease(60):  # its lease expired: the next writer gets it
        pass
    stuck.release()


def test_failing_to_prune_old_lease_records_does_not_fail_the_acquisition(registry, monkeypatch, caplog):
    """F-29: old records are pruned after the new lease exists; a failed delete is only a warning."""
    for number in (1, 2):
        put(registry, f"lease/{number:06d}.json", json.dumps({"owner": "old", "expires": 0, "released": True}).encode())

    def refuse(*args, **kwargs):
        raise PermissionError("AccessDenied: s3:DeleteObject")

    monkeypatch.setattr(registry.fs, "rm", refuse)
    with caplog.at_level("WARNING", logger="charnn.registry"):
        with registry.lease(60) as lease:
            assert lease.number == 3
            lease.check()
    assert "000001.json" in caplog.text


def test_a_rejected_candidate_is_recorded_only_under_the_lease(registry):
    """F-29: reject() writes only while the lease is still held."""
    with registry.lease(60) as lease:
        registry.reject("first", INFO, lease)
        assert registry.fs.exists(f"{registry.path}/rejected/first.json")
        take_over(registry, lease.number)
        with pytest.raises(RegistryBusy, match="lost the lease"):
            registry.reject("second", INFO, lease)
    assert not registry.fs.exists(f"{registry.path}/rejected/second.json")


def test_version_files_reach_the_disk_before_the_pointer_moves(tmp_path, monkeypatch):
    """F-4: model.pt, version.json and their directories are fsynced before published.json is replaced."""
    registry = ModelRegistry(str(tmp_path / "models" / "m"), Store())
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with registry.lease(60) as lease:
        registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None)
    moved = events.index(("replace", f"{registry.path}/published.json"))
    synced = {path for kind, path in events[:moved] if kind == "fsync"}
    version = f"{registry.path}/versions/v0001"
    assert {f"{version}/model.pt", f"{version}/version.json", version, f"{registry.path}/versions"} <= synced, synced


# ---------------------------------------------------------------------------------------------
# S3 answers that moto gives only when a test intercepts the request (its server stays real).

@pytest.fixture
def s3_registry(moto_s3) -> ModelRegistry:
    name = f"charnn-registry-{time.time_ns()}"
    moto_s3.client().create_bucket(Bucket=name)
    return ModelRegistry(f"s3://{name}/runs/models/m", Store(endpoint_url=moto_s3.endpoint))


def own_client(registry: ModelRegistry):
    """Give the registry an S3 client of its own (fsspec shares one per endpoint), to hook its requests."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **registry.store._fsspec_options(registry.url))
    fs.connect()
    registry.fs = fs
    return fs.s3.meta.events


def _targets(request, key: str) -> bool:
    return request.method == "PUT" and urllib.parse.urlsplit(request.url).path.endswith("/" + key)


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    async def read(self, *args) -> bytes:
        return self.data


def _answer(request, status: int, code: str):
    from aiobotocore.awsrequest import AioAWSResponse

    xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>test</Message></Error>"
    return AioAWSResponse(request.url, status, {"content-type": "application/xml"}, _Body(xml.encode()))


def lose_first_reply(registry: ModelRegistry, key: str, header: str | None = None) -> list:
    """The registry's next PUT of ``key`` (carrying ``header``, if given) reaches the server, but its
    reply is lost, so botocore retries it; returns a list that records the loss."""
    import botocore.exceptions

    events = own_client(registry)
    lost = []

    async def lose_the_reply(request, **_):
        if not lost and _targets(request, key) and (header is None or header in request.headers):
            lost.append(key)
            await registry.fs.s3._endpoint.http_session.send(request)  # the server stores it...
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)  # ...the reply never comes

    events.register("before-send.s3.PutObject", lose_the_reply)
    return lost


@pytest.mark.parametrize("key", ["lease/000001.json", "versions/v0001/model.pt", "published.json"])
def test_a_conditional_write_retried_after_its_reply_was_lost_is_recognised_as_ours(s3_registry, tmp_path, key):
    """F-21: the PUT lands, its reply is lost, botocore retries, and the retry gets 412 on our own object."""
    lost = lose_first_reply(s3_registry, key)
    with s3_registry.lease(60) as lease:
        assert s3_registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None).name == "v0001"
        lease.check()
    assert lost == [key]
    assert s3_registry.published().name == "v0001"


def test_a_renewal_retried_after_its_reply_was_lost_keeps_the_lease(s3_registry):
    """F-21: a renewal (If-Match) that landed but whose retry got 412 is still ours."""
    lost = lose_first_reply(s3_registry, "lease/000001.json", header="If-Match")
    lease = s3_registry.lease(60)
    lease.acquire()
    assert lease._renew_once() and lost
    lease.check()
    lease.release()
    assert record(s3_registry, 1)["released"] and record(s3_registry, 1)["owner"] == lease.owner


@pytest.mark.parametrize("status, code", [(409, "ConditionalRequestConflict"), (412, "PreconditionFailed")])
def test_s3_conflict_answers_to_a_lease_create_mean_busy(s3_registry, moto_s3, status, code):
    """F-21: 409 (a concurrent conditional write) and a 412 without its Condition element are a lost race."""
    events = own_client(s3_registry)
    bucket, prefix = s3_registry.path.split("/", 1)

    def answer(request, **_):
        if _targets(request, "lease/000001.json"):
            if status == 412:  # the other writer's create landed first
                other = {"owner": "another-host:1:racer", "expires": time.time() + 600, "released": False}
                moto_s3.client().put_object(Bucket=bucket, Key=f"{prefix}/lease/000001.json", Body=json.dumps(other))
            return _answer(request, status, code)

    events.register("before-send.s3.PutObject", answer)
    with pytest.raises(RegistryBusy, match="took its lease just now"):
        s3_registry.lease(60).acquire()


def test_a_store_that_ignores_conditional_writes_is_refused_at_start(s3_registry):
    """F-1: an S3-compatible store that drops If-None-Match / If-Match would let two writers in."""
    events = own_client(s3_registry)

    def drop_conditions(request, **_):
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    events.register("before-sign.s3.PutObject", drop_conditions)
    with pytest.raises(RegistryError, match=r"S3-compatible endpoint http://127\.0\.0\.1:\d+ ignores conditional writes"):
        s3_registry.lease(60).acquire()
    s3_registry.fs.invalidate_cache()
    assert s3_registry.fs.find(f"{s3_registry.path}/lease") == []  # the probe was cleaned up


# ---------------------------------------------------------------------------------------------
# The second audit (N-4, N-8, N-11, F-20, F-27).

def test_a_candidate_never_replaces_a_model_it_was_not_compared_with(registry, tmp_path):
    """N-4: X passes its check and freezes past its lease; Y takes the lease and reads the incumbent
    v0001; X wakes and publishes v0002 (it was compared with v0001: legitimate); Y, compared with
    v0001 only, must not publish over v0002."""
    with registry.lease(60) as first:
        registry.publish(_checkpoint(tmp_path, 1), INFO, first, replaces=None)
    x = registry.lease(60)
    x.acquire()
    x_incumbent = registry.published()
    stalled, resume = threading.Event(), threading.Event()
    x.check = _stall_in_move_pointer(x.check, stalled, resume)
    result = {}
    thread = threading.Thread(target=lambda: result.update(x=registry.publish(_checkpoint(tmp_path, 2), INFO, x,
                                                                               replaces=x_incumbent).name))
    thread.start()
    assert stalled.wait(60)
    expire(registry, x.number)
    y = ModelRegistry(registry.url, registry.store).lease(60)
    y.acquire()
    y_incumbent = registry.published()
    assert y_incumbent.name == "v0001"
    resume.set()
    thread.join(60)
    assert result["x"] == "v0002" and registry.published().name == "v0002"
    with pytest.raises(RegistryBusy, match=r"names v0002 since this job compared its candidate with v0001"):
        registry.publish(_checkpoint(tmp_path, 3), INFO, y, replaces=y_incumbent)
    assert registry.published().name == "v0002"
    y.release()
    x.release()


def test_nothing_published_means_a_candidate_may_not_replace_a_pointer_that_appeared(registry, tmp_path):
    with registry.lease(60) as lease:
        registry.publish(_checkpoint(tmp_path, 1), INFO, lease, replaces=None)
        with pytest.raises(RegistryBusy, match="names v0001 since this job compared its candidate with nothing"):
            registry.publish(_checkpoint(tmp_path, 2), INFO, lease, replaces=None)
    assert registry.published().name == "v0001"


def test_a_writer_that_lost_its_lease_takes_no_version_number(registry, tmp_path):
    """N-11: the stale writer is refused before it creates any version file, so the holder's version
    number stays free."""
    stale = registry.lease(60)
    stale.acquire()
    expire(registry, stale.number)
    with registry.lease(60) as holder:
        with pytest.raises(RegistryBusy, match="lost the lease"):
            registry.publish(_checkpoint(tmp_path, 1), INFO, stale, replaces=None)
        assert registry.versions() == []
        assert registry.publish(_checkpoint(tmp_path, 2), INFO, holder, replaces=None).name == "v0001"
    stale.release()


def _hold_lock_then_freeze(path: str, ready) -> None:
    """A process that takes the registry's lock file and never lets go (frozen, as by SIGSTOP)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.set()
    time.sleep(600)


def test_a_frozen_holder_of_the_local_lock_makes_others_busy_not_hung(tmp_path, monkeypatch):
    """N-8: the local registry's flock is waited for at most LOCK_WAIT_S, then the job is busy (75)."""
    import charnn.storage
    from charnn.errors import Busy

    registry = ModelRegistry(str(tmp_path / "models" / "m"), Store())
    registry.fs.makedirs(registry.path, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_lock_then_freeze, args=(f"{registry.path}/.lock", ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(60)
        monkeypatch.setattr(charnn.storage, "LOCK_WAIT_S", 0.5)
        started = time.monotonic()
        with pytest.raises(Busy, match=r"the lock file .*/\.lock is held by another job") as info:
            registry.lease(60).acquire()
        assert time.monotonic() - started < 10 and info.value.exit_status == 75
    finally:
        holder.kill()
        holder.join(10)
    with registry.lease(60):  # the holder is gone: the lock is free again
        pass


@pytest.mark.parametrize("name", ["../../../../elsewhere", "v0001/../../x", "", 7, None, ["v0001"]])
def test_a_pointer_naming_anything_but_a_version_is_refused(registry, name):
    """F-20: the pointer's version is a path segment; nothing outside versions/ is ever loaded."""
    put(registry, "published.json", json.dumps({"version": name, "fence": 1}).encode())
    with pytest.raises(RegistryError, match="which is not a version name"):
        registry.published()


def test_a_damaged_sources_table_is_one_line(registry, tmp_path):
    """F-27(c): a published version whose sources.parquet is damaged."""
    with registry.lease(60) as lease:
        registry.publish(_checkpoint(tmp_path, 1), VersionInfo(), lease, replaces=None,
                         files={"sources.parquet": b"PAR1 not parquet"})
    with pytest.raises(RegistryError, match=r"cannot read the documents of version v0001: .*restore that file") as info:
        registry.published().sources()
    assert "\n" not in str(info.value)


def test_a_checkpoint_that_vanished_before_publication_is_one_line(registry, tmp_path):
    """F-27(b): a missing object is a one-line StorageError, not a FileNotFoundError traceback."""
    from charnn.storage import StorageError

    with registry.lease(60) as lease:
        with pytest.raises(StorageError, match="cannot publish a model version"):
            registry.publish(str(tmp_path / "gone"), INFO, lease, replaces=None)
    assert registry.published() is None


def _take_lease_and_die(url: str, endpoint: str | None) -> None:
    """A writer killed outright (SIGKILL: no release) while it holds a long lease."""
    import signal

    open_registry(url, endpoint).lease(600).acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_holder_killed_on_this_machine_does_not_keep_its_lease_until_expiry(registry):
    """A job killed outright (SIGKILL, OOM) on this machine: the next job need not wait out the lease
    (600 s here), since the record says which process held it and that process is gone."""
    context = multiprocessing.get_context("spawn")
    killed = context.Process(target=_take_lease_and_die, args=(registry.url, endpoint_of(registry)))
    killed.start()
    killed.join(120)
    assert killed.exitcode == -9 and not record(registry, 1)["released"]
    with registry.lease(60) as lease:
        assert lease.number == 2


def test_a_holder_on_another_machine_keeps_its_lease(registry):
    other_machine = {"boot": "another-boot-id", "pidns": "pid:[1]", "pid": 2**22 + 1}  # a pid that is not running here
    put(registry, "lease/000001.json", json.dumps({"owner": "elsewhere:1:x", "expires": time.time() + 600,
                                                   "released": False, "process": other_machine}).encode())
    with pytest.raises(RegistryBusy, match="another retrain holds the lease"):
        registry.lease(60).acquire()


@pytest.mark.parametrize("first, second", [
    ("/corpus/auth=public/a.txt", "/corpus/auth=public/b.txt"),
    ("s3://b/lang=en/sig=x/doc.txt", "s3://b/lang=en/sig=y/doc.txt"),
    ("https://host/view.php?key=1", "https://host/view.php?key=2"),
    ("https://me:one@host/a.txt", "https://me:two@host/a.txt")])
def test_retrain_change_detection_keeps_documents_whose_urls_mask_alike_apart(registry, tmp_path, first, second):
    """N-1: the published version's documents and the listed ones are compared by url_key, never by the
    masked URL; an older table (masked URLs, no url_key) makes such documents count as changed."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from charnn.cli.retrain import changed_documents
    from charnn.storage import redact

    checkpoint = _checkpoint(tmp_path, 1)

    def version_with(table):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        with registry.lease(60) as lease:
            registry.publish(checkpoint, VersionInfo(), lease, replaces=registry.published(),
                             files={"sources.parquet": buffer.getvalue()})
        return registry.published()

    assert redact(first) == redact(second)
    current = {url_key(first): "sha256:a", url_key(second): "sha256:b"}
    published = version_with(pa.table({"url": [redact(first), redact(second)], "url_key": list(current),
                                       "identity": ["sha256:a", "sha256:b"]}))
    assert changed_documents(current, published.sources()) == ([], [])
    edited = {**current, url_key(first): "sha256:a2"}
    assert changed_documents(edited, published.sources()) == ([url_key(first)], [])
    older = version_with(pa.table({"url": [redact(first)], "identity": ["sha256:a"]}))  # before url_key
    new, _ = changed_documents(current, older.sources())
    assert sorted(new) == sorted(current)
