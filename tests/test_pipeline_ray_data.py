"""The pipeline on Ray Data, with real components: ``open_dataset`` over a built dataset, an encode
task's worker SIGKILLed mid-build (Ray Data retries the task; the dataset is the undisturbed one,
byte for byte), the build's operators in the dashboard's Data view of a `ray start` cluster, and
``data.max_concurrency`` reaching the operators."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from support.env import REPO
from support.jobs import last_json, write_corpus
from test_pipeline import expected_stream, read_rows, request
from charnn.spec_loader import SpecError, load_spec
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.cache import cache_url
from charnn.data.dataset import DatasetError, load_manifest
from charnn.data.runners import RayTasks
from charnn.storage import Store

pytestmark = pytest.mark.ray
SMOKE = str(REPO / "jobs" / "specs" / "smoke.yaml")
CAPS = re.compile(r"TaskPoolMapOperator\[(\w+)\]: (\w+)")  # an operator's cap, in Ray Data's log


# --- open_dataset ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory) -> tuple[str, object]:
    """A dataset of about 4 MB: with 1 MB shards, each worker's train rows span two shards."""
    root = tmp_path_factory.mktemp("built")
    write_corpus(root / "corpus", documents=8, lines=16000)
    url = build_dataset(request(root, [root / "corpus"], shard_mb=1)).url
    return url, load_manifest(url)


def read_all(dataset) -> pa.Table:
    return pa.concat_tables(list(dataset.iter_batches(batch_size=None, batch_format="pyarrow")))


def joined_rows(table: pa.Table) -> dict[int, np.ndarray]:
    """Each row's tokens: its records joined in step order (a record's last token, the look-ahead,
    is the next record's first)."""
    pieces: dict[int, list] = {}
    order = sorted(range(table.num_rows), key=lambda i: (table["row"][i].as_py(), table["start"][i].as_py()))
    for i in order:
        pieces.setdefault(table["row"][i].as_py(), []).append(table["tokens"][i].values.to_numpy())
    return {row: np.concatenate([p[:-1] for p in parts[:-1]] + [parts[-1]]) for row, parts in pieces.items()}


@pytest.mark.parametrize("split", ["train", "val"])
def test_open_dataset_yields_every_shards_rows_as_laid_out(built, split):
    import charnn.data

    url, manifest = built
    info = manifest.splits[split]
    if split == "train":  # the rows are cut over shards: the join below is exercised
        assert all(sum(s.worker == w for s in info.shards) >= 2 for w in range(manifest.workers)), info.shards
    dataset = charnn.data.open_dataset(url, split)
    assert dataset.count() == sum(s.rows[1] - s.rows[0] for s in info.shards)
    table = read_all(dataset)
    assert table.column_names == ["row", "start", "tokens", "worker"]
    T = manifest.seq_len
    owners = {(r, s.steps[0] * T): s.worker for s in info.shards for r in range(*s.rows)}
    assert dict(zip(zip(table["row"].to_pylist(), table["start"].to_pylist()), table["worker"].to_pylist())) == owners
    assert table.num_rows == len(owners)
    rows, stream, L = joined_rows(table), expected_stream(manifest, split), info.row_length
    assert sorted(rows) == list(range(info.rows))
    for r, read in enumerate(read_rows(url, manifest, split, manifest.workers)):  # SplitReader's windows
        assert np.array_equal(rows[r], read) and np.array_equal(rows[r], stream[r * L: r * L + L + 1]), r


def test_open_dataset_of_an_unknown_split_or_no_dataset_is_one_line(built, tmp_path):
    import charnn.data

    url, _ = built
    with pytest.raises(DatasetError) as info:
        charnn.data.open_dataset(url, "test")
    assert str(info.value) == f"{url} has no split 'test'; choose one of train, val"
    with pytest.raises(DatasetError, match="has no manifest.json") as info:
        charnn.data.open_dataset(str(tmp_path), "train")
    assert "\n" not in str(info.value)


# --- a worker killed mid-build -----------------------------------------------------------------

def large_corpus(directory: Path, files: int = 4, mb: int = 32) -> Path:
    """``files`` documents of ``mb`` MB (an encode task each, a few tenths of a second of a core),
    each with a header of its own so that no two are alike."""
    directory.mkdir(parents=True)
    block = b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 64
    body = block * (mb * 2**20 // len(block))
    for i in range(files):
        (directory / f"part-{i}.txt").write_bytes(f"part {i} of {files}\n".encode() + body)
    return directory


class EncodeKiller(threading.Thread):
    """While in its ``with``: SIGKILLs the first Ray worker seen running an encode task
    (``ray::ReadEncodeDocuments``) while it holds a blob of ``blobs`` open under its temporary
    name (mid-encode, and in this test's cache), and that worker only (no raylet, no other
    worker); ``killed``: (pid, the blob it was writing, when)."""

    def __init__(self, blobs: Path):
        super().__init__(daemon=True)
        self.blobs, self.done, self.killed = os.path.realpath(blobs), threading.Event(), None

    def __enter__(self) -> "EncodeKiller":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        while not self.done.is_set() and self.killed is None:
            for pid, blob in self.encoding():
                os.kill(pid, signal.SIGKILL)
                self.killed = (pid, Path(blob), time.time())
                break
            time.sleep(0.01)

    def encoding(self):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if not f.read().startswith(b"ray::ReadEncodeDocuments"):
                        continue
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:  # gone meanwhile
                continue
            yield from ((int(pid), link) for link in links if link.startswith(self.blobs) and ".u8.tmp-" in link)


def blobs_of(dataset_root: Path) -> Path:
    return Path(cache_url(str(dataset_root), "gorner98"), "blobs")


def digests(url: str) -> dict[str, str]:
    """SHA-256 of every file of a dataset version's segments (shards, sources.parquet, segment.json)."""
    directory = Path(url).parent.parent
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("segments/*/*"))}


def cache_files(dataset_root: Path, folder: str) -> list[str]:
    return sorted(p.name for p in (blobs_of(dataset_root).parent / folder).iterdir())


def printed(capfd, *words: str, seconds: float = 10) -> str:
    """What this process printed (Ray's driver prints the raylet's notes from a thread of its own),
    once it holds every one of ``words`` or ``seconds`` have passed."""
    said, deadline = "", time.monotonic() + seconds
    while not all(word in said for word in words) and time.monotonic() < deadline:
        said += "".join(capfd.readouterr())
        time.sleep(0.1)
    return said


@pytest.mark.faults
def test_an_encode_worker_killed_mid_build_is_retried_and_the_dataset_is_the_undisturbed_one(
        ray_local, tmp_path, capfd, record_property):
    corpus = large_corpus(tmp_path / "corpus")
    started = time.time()
    with EncodeKiller(blobs_of(tmp_path / "killed" / "datasets")) as killer:  # request()'s dataset_root
        killed_url = build_dataset(request(tmp_path / "killed", [corpus], shard_mb=8), runner=RayTasks()).url
    ended = time.time()
    assert killer.killed is not None, "no encode task was seen writing its blob: nothing was killed"
    pid, blob, at = killer.killed
    assert started < at < ended and not Path(f"/proc/{pid}").exists()
    said = printed(capfd, f"Worker PID: {pid}", "will be retried")  # the raylet's word on the worker and its task
    assert f"Worker PID: {pid}" in said and "will be retried" in said, said[-3000:]
    # the killed task's blob never got its name or an index; its retry wrote a blob of its own
    cache = tmp_path / "killed" / "datasets"
    blobs, indexes = cache_files(cache, "blobs"), cache_files(cache, "index")
    assert blob.exists() and [b for b in blobs if ".tmp-" in b] == [blob.name]
    assert [b.removesuffix(".u8") for b in blobs if ".tmp-" not in b] == [i.removesuffix(".parquet") for i in indexes]
    assert len(indexes) == 4

    undisturbed_url = build_dataset(request(tmp_path / "undisturbed", [corpus], shard_mb=8)).url
    assert Path(killed_url).name == Path(undisturbed_url).name
    assert load_manifest(killed_url) == load_manifest(undisturbed_url)
    assert Path(killed_url, "manifest.json").read_bytes() == Path(undisturbed_url, "manifest.json").read_bytes()
    files = digests(killed_url)  # shards, sources.parquet and segment.json
    assert len([f for f in files if f.endswith(".arrow")]) > 2 and files == digests(undisturbed_url)
    record_property("fault", {"fault": "SIGKILL an encode task's worker mid-build (Ray Data)", "injected": 1,
                              "recoveries": 1, "steps recomputed": "1 encode task",
                              "final loss vs uninterrupted": "dataset byte-identical"})


# --- the dashboard's Data view -----------------------------------------------------------------

def dashboard(cluster, path: str, token: bool = True) -> dict:
    """GET ``path`` of the cluster's dashboard (on 127.0.0.1, no proxy), with the token that Ray's
    own clients send (~/.ray/auth_token) unless ``token`` is False."""
    assert cluster.address.startswith("http://127.0.0.1:")
    secret = (Path.home() / ".ray" / "auth_token").read_text().strip()
    headers = {"Authorization": f"Bearer {secret}"} if token else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(cluster.address + path, headers=headers), timeout=30) as response:
        return json.loads(response.read())


def finished_datasets(cluster, job_id: str, expected: int, seconds: float = 60) -> list[dict]:
    """The Ray Data datasets of driver job ``job_id``, once ``expected`` of them have all finished
    (the driver reports their states to Ray Data's stats actor as it goes)."""
    deadline = time.monotonic() + seconds
    while True:
        datasets = dashboard(cluster, f"/api/data/datasets/{job_id}")["datasets"]
        if len(datasets) == expected and all(d["state"] == "FINISHED" for d in datasets):
            return datasets
        assert time.monotonic() < deadline, json.dumps(datasets)[:3000]
        time.sleep(1)


def test_the_dashboards_data_view_shows_the_builds_operators_finished(ray_cluster, tmp_path):
    write_corpus(tmp_path / "corpus", documents=8, lines=120)
    submission = f"charnn-data-view-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(ray_cluster.job_command(
        submission, "tokenize_corpus.py", "--spec", "jobs/specs/smoke.yaml", "--set",
        f"data.sources=[{tmp_path / 'corpus'}]", "--set", f"data.dataset_root={tmp_path / 'datasets'}",
        "--set", "data.in_process_mb=0"),
        env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    logs = ray_cluster.logs(submission)
    assert proc.returncode == 0, logs[-3000:] + proc.stderr[-3000:]
    manifest = load_manifest(last_json(logs)["dataset"])
    with pytest.raises(urllib.error.HTTPError, match="401"):  # token auth is on: the token is what lets us in
        dashboard(ray_cluster, f"/api/jobs/{submission}", token=False)
    job = dashboard(ray_cluster, f"/api/jobs/{submission}")
    assert job["status"] == "SUCCEEDED" and job["driver_info"]["id"] == job["job_id"] != submission
    by_operators = {tuple(op["name"] for op in d["operators"]): d
                    for d in finished_datasets(ray_cluster, job["job_id"], expected=2)}
    # Ray 2.60 names a write's operator "Write" whatever its sink (ShardSink.get_name() only reaches the log)
    assert sorted(by_operators) == [("Input", "ReadEncodeDocuments"), ("Input", "Write")]
    encode, write = by_operators["Input", "ReadEncodeDocuments"], by_operators["Input", "Write"]
    assert all(op["state"] == "FINISHED" and op["progress"] == op["total"]
               for d in (encode, write) for op in d["operators"])
    assert encode["total_rows"] == manifest.documents == 8  # a row of figures per document
    assert write["total_rows"] == sum(len(s.shards) for s in manifest.splits.values())  # a row per shard
    assert encode["start_time"] < write["start_time"] and encode["job_id"] == write["job_id"] == job["job_id"]


# --- data.max_concurrency ----------------------------------------------------------------------

def test_data_max_concurrency_reaches_the_pipelines_stage_options(tmp_path):
    overrides = [f"data.sources=[{tmp_path}]", f"data.dataset_root={tmp_path / 'datasets'}"]
    assert DatasetRequest.from_spec(load_spec(SMOKE, [*overrides, "data.max_concurrency=1"])).stage.concurrency == 1
    assert DatasetRequest.from_spec(load_spec(SMOKE, overrides)).stage.concurrency is None  # Ray Data decides


@pytest.mark.parametrize("limit, cap", [(1, "1"), (None, "inf")], ids=["max_concurrency=1", "unset"])
def test_data_max_concurrency_is_the_cap_ray_data_puts_on_both_stages(ray_local, tmp_path, caplog, limit, cap):
    """From the spec to Ray Data's executor: the encode read and the shard write each run under
    the cap (as Ray Data's concurrency-cap policy logs it when an execution starts)."""
    write_corpus(tmp_path / "corpus", documents=8, lines=120)
    overrides = [f"data.sources=[{tmp_path / 'corpus'}]", f"data.dataset_root={tmp_path / 'datasets'}",
                 "data.in_process_mb=0", *([f"data.max_concurrency={limit}"] * bool(limit))]
    wanted = DatasetRequest.from_spec(load_spec(SMOKE, overrides))
    with caplog.at_level(logging.DEBUG, logger="ray.data"):
        build_dataset(wanted)
    caps = [dict(CAPS.findall(r.getMessage())) for r in caplog.records
            if r.getMessage().startswith("ConcurrencyCapBackpressurePolicy caps:")]
    assert caps == [{"ReadEncodeDocuments": cap}, {"Write": cap}]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_data_max_concurrency_below_one_is_refused_with_one_line(value):
    with pytest.raises(SpecError) as info:
        load_spec(SMOKE, [f"data.max_concurrency={value}"])
    assert str(info.value) == f"data.max_concurrency must be > 0, got {value} (in --set data.max_concurrency={value})"


def test_data_max_concurrency_not_an_int_is_refused_naming_an_int():
    with pytest.raises(SpecError) as info:
        load_spec(SMOKE, ["data.max_concurrency=1.5"])
    assert "data.max_concurrency must be an int" in str(info.value) and "got float 1.5" in str(info.value)


# --- the encode stage's read tasks ----------------------------------------------------------------

def test_a_read_task_stays_small_however_many_documents_its_group_holds(ray_local):
    """A group of 200,000 small documents pickled into its read function is megabytes, which Ray
    Data warns about (and its warning broke on a read function without ``__name__``): the group
    goes through the object store and the read task stays small."""
    from ray import cloudpickle

    from charnn.data.operators import EncodeSource

    count = 200_000
    group = pa.table({"url": [f"/corpus/d{n // 1000:05d}/doc-{n:07d}.txt" for n in range(count)],
                      "size": pa.array(np.full(count, 200), pa.int64()),
                      "version": [f"mtime_ns:{n}" for n in range(count)]})
    (task,) = EncodeSource([group], "/nowhere", "gorner98", Store()).get_read_tasks(1)
    assert len(cloudpickle.dumps(task.read_fn)) < 64 * 2**10
    assert task.read_fn.__name__ and task.metadata.num_rows == count
