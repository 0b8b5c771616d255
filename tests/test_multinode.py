"""Real multi-node runs (issue 23): a head and three worker nodes of 1 CPU each on this machine
(tests/support/cluster.py), jobs sent with `ray job submit`, a whole node killed as a lost
machine.  A run that loses a node restarts on a spare one, or with `cluster.min_workers` goes on
with fewer workers and grows back when a node joins; every way, it ends as the uninterrupted run
ends (CPU, dropout 0: the same losses within 1e-5 and the same weights).

Storage is local paths under a tmp dir with `storage.shared_path=true`: every node shares this
machine's disk.  `pytest -m multinode` runs these alone; the node-loss tests are also marked
`faults`, and their rows join the fault table."""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import pytest

from charnn.cli.runtime import fold_tracebacks
from support.cluster import MultiNodeCluster
from support.jobs import SMOKE_ROWS, same_run, write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.multinode]
STEPS, EVERY = 30, 10
WORKER_NODES = 3


# Ray Train gives a worker group cluster.start_timeout_s (60 s) to start.  A group that fails
# because a node's worker died (its peers' gloo connections close at once) restarts before Ray
# marks the node dead, and the elastic policy's view of the nodes is refreshed every 20 s: it asks
# for the lost node's workers too and waits out that timeout before it tries again with fewer.
START_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module: the tests take nodes away and add them back (``live_nodes``)."""
    started = MultiNodeCluster(Path(tempfile.mkdtemp(prefix="charnn-n")), nodes=WORKER_NODES).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The smoke corpus (as conftest's smoke_root writes it), the datasets and the runs of this module."""
    directory = tmp_path_factory.mktemp("multinode")
    write_corpus(directory / "corpus", documents=6, lines=14, seed=5)
    return directory


def train_args(root: Path, name: str, *extra: str, shared: bool = True) -> list[str]:
    """jobs/train.py's arguments: the smoke run of test_faults (2 workers x 4 rows, 30 steps, a
    checkpoint every 10, the loss logged every step), a lost node allowed for."""
    return ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{root / 'corpus'}]",
            "--set", f"data.dataset_root={root / 'datasets'}", "--set", f"run.storage={root / 'runs'}",
            "--set", f"run.name={name}", "--set", "cluster.num_workers=2", "--set", "cluster.max_failures=3",
            "--set", f"train.batch_per_worker={SMOKE_ROWS // 2}", "--set", f"train.steps={STEPS}",
            "--set", "train.log_every=1", "--set", f"train.checkpoint_every={EVERY}",
            "--set", "train.validate_every=0", "--set", "model.dropout=0.0",
            "--set", f"cluster.start_timeout_s={START_TIMEOUT_S}",
            *(["--set", "storage.shared_path=true"] if shared else []), *extra]


def faults(directory: Path, spec: str, pause_s: float) -> dict:
    return {"CHARNN_FAULTS": spec, "CHARNN_FAULT_DIR": str(directory), "CHARNN_FAULT_PAUSE_S": str(pause_s)}


def live_nodes(cluster: MultiNodeCluster, count: int) -> None:
    """Make exactly ``count`` worker nodes live: kill the newest ones, or add back the ones killed."""
    while len(cluster.live) > count:
        cluster.kill_node(cluster.live[-1])
    for ip in [ip for ip in cluster.worker_ips if ip not in cluster.live][:count - len(cluster.live)]:
        cluster.add_node(ip)


def paused_node(cluster: MultiNodeCluster, marker: Path, job, seconds: float = 300) -> str:
    """The node of the worker that fired a pause fault: the pid its marker holds."""
    deadline = time.monotonic() + seconds
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline and job.info()["status"] in ("PENDING", "RUNNING"), job.logs()[-3000:]
        time.sleep(0.2)
    node = cluster.node_of_pid(int(marker.read_text()))
    assert node, f"no worker node holds pid {marker.read_text()}"
    return node


LOSS_TOLD = re.compile(r"Connection (closed|reset) by peer|ActorDiedError|ActorUnavailableError|"
                       r"died unexpectedly|\[FailurePolicy\] RETRY")


def resumed_at(logs: str, name: str) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed {re.escape(name)} at step (\d+)/", logs)]


def workers_by_step(root: Path, name: str) -> dict[int, int]:
    """How many workers trained each step, from the run's metrics.jsonl."""
    lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
    points = [json.loads(line) for line in lines if line.strip()]
    return {p["step"]: p["workers"] for p in points if p["split"] == "train"}


@pytest.fixture(scope="module")
def reference(cluster, root) -> dict:
    """The uninterrupted run on the cluster: 2 workers on 2 of its 3 worker nodes."""
    live_nodes(cluster, WORKER_NODES)
    status, logs, result = cluster.run("train.py", *train_args(root, "reference"))
    assert status == 0 and result and result["steps"] == STEPS, logs[-3000:]
    return result


def test_worker_tracebacks_are_folded_to_their_last_line():
    lines = ["Error in training function:", "Traceback (most recent call last):", '  File "x.py", line 1, in f',
             "    f()", "RuntimeError: Connection closed by peer", "charnn: step 3/30", "",
             "Traceback (most recent call last):", "  File y", "ValueError: no"]
    assert fold_tracebacks(lines) == ["Error in training function:", "RuntimeError: Connection closed by peer",
                                      "charnn: step 3/30", "", "ValueError: no"]


def test_a_local_path_on_a_multi_node_cluster_needs_shared_path(cluster, root):
    status, logs, _ = cluster.run("train.py", *train_args(root, "unshared", shared=False))
    assert status == 2, logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("charnn: error:")]
    assert len(errors) == 1 and "run.storage" in errors[0] and "local path" in errors[0], logs[-3000:]
    assert "Traceback" not in logs
    assert not (root / "runs" / "unshared").exists()


@pytest.mark.faults
def test_a_lost_node_restarts_the_run_on_a_spare_node(cluster, root, reference, tmp_path, record_property):
    """Rank 1's node dies after the checkpoint of step 10; the third node takes its place."""
    live_nodes(cluster, WORKER_NODES)
    job = cluster.submit("train.py", *train_args(root, "spare"), env_vars=faults(tmp_path, "pause@10:1", 120))
    lost = paused_node(cluster, tmp_path / "pause-10-1", job)
    cluster.kill_node(lost)
    status, logs, result = job.wait()
    assert status == 0 and result["steps"] == STEPS, logs[-3000:]
    assert resumed_at(logs, "spare") == [10], logs[-3000:]
    assert set(workers_by_step(root, "spare").values()) == {2}  # after the loss, on the spare node and the other
    diff = same_run(root, "spare", result, ("reference", reference), STEPS)
    record_property("fault", {"fault": "a worker's node lost, a spare node left", "injected": 1, "recoveries": 1,
                              "steps recomputed": 0, "final loss vs uninterrupted": f"{diff:.1e}"})


@pytest.fixture(scope="module")
def elastic(cluster, root, reference, tmp_path_factory) -> tuple:
    """An elastic run (cluster.min_workers=1) on exactly 2 worker nodes: rank 1's node dies after the
    checkpoint of step 10, so 1 worker goes on; a node joins while that worker pauses after the
    checkpoint of step 20, and the next resize check (every 2 s) grows the group back to 2."""
    live_nodes(cluster, 2)
    markers = tmp_path_factory.mktemp("elastic-markers")
    args = train_args(root, "elastic", "--set", "cluster.min_workers=1", "--set", "cluster.resize_interval_s=2")
    job = cluster.submit("train.py", *args, env_vars=faults(markers, "pause@10:1,pause@20:0", 120))
    cluster.kill_node(paused_node(cluster, markers / "pause-10-1", job))
    paused_node(cluster, markers / "pause-20-0", job)
    live_nodes(cluster, 2)
    status, logs, result = job.wait()
    assert status == 0 and result and result["steps"] == STEPS, logs[-3000:]
    return logs, result


@pytest.mark.faults
def test_a_lost_node_without_a_spare_shrinks_the_group_and_the_run_is_the_same(root, reference, elastic,
                                                                             record_property):
    logs, result = elastic
    assert "charnn: 1 worker trains elastic from step 10 (was 2)" in logs, logs[-3000:]
    # the lost worker's error and Ray Train's retries are their last lines, not tracebacks
    assert "Traceback" not in logs, logs[max(0, logs.find("Traceback") - 1500):][:5000]
    # who tells of the loss first is a race: the surviving rank's collective (gloo: connection closed
    # or reset by peer), or Ray, whose controller may stop that rank before its collective fails
    assert LOSS_TOLD.search(logs), logs[-5000:]
    assert [count for _, count in result["workers"]][:2] == [2, 1], result["workers"]
    per_step = workers_by_step(root, "elastic")
    assert {per_step[step] for step in range(1, 11)} == {2} and {per_step[step] for step in range(11, 21)} == {1}
    diff = same_run(root, "elastic", result, ("reference", reference), STEPS)
    record_property("fault", {"fault": "a worker's node lost, no spare: 2 -> 1 workers (min_workers=1)",
                              "injected": 1, "recoveries": 1, "steps recomputed": 0,
                              "final loss vs uninterrupted": f"{diff:.1e}"})


@pytest.mark.faults
def test_a_node_added_back_grows_the_group_at_the_next_resize_check(root, reference, elastic, record_property):
    logs, result = elastic
    assert "charnn: 2 workers train elastic from step 20 (was 1)" in logs, logs[-3000:]
    assert [count for _, count in result["workers"]] == [2, 1, 2], result["workers"]
    assert resumed_at(logs, "elastic") == [10, 20], logs[-3000:]
    per_step = workers_by_step(root, "elastic")
    assert {per_step[step] for step in range(21, STEPS + 1)} == {2}
    diff = same_run(root, "elastic", result, ("reference", reference), STEPS)
    record_property("fault", {"fault": "a node joins: 1 -> 2 workers at the next resize check", "injected": 1,
                              "recoveries": 1, "steps recomputed": 0, "final loss vs uninterrupted": f"{diff:.1e}"})
