"""Faults injected into real runs: dead workers, a stopped job, a damaged checkpoint, a storage
outage.  Each run must end as the uninterrupted run ends (CPU, dropout 0: within 1e-5).

`pytest -m faults` runs these alone and ends with one table (each test records its row as the "fault" property)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from support.env import FAST_TRAIN_ENV, REPO
from support.jobs import SMOKE_ROWS, same_run, train_smoke
from support.servers import FlakyProxy

pytestmark = [pytest.mark.ray, pytest.mark.faults]
STEPS, EVERY = 30, 10


@pytest.fixture(scope="module")
def root(smoke_root) -> Path:
    return smoke_root


@pytest.fixture(scope="module")
def uninterrupted(two_workers) -> dict:
    return two_workers


@pytest.fixture
def finished_copy(root, uninterrupted):
    """A copy of the uninterrupted run under another name: a finished run, its one checkpoint at step 30."""
    import shutil

    def copy(name: str) -> Path:
        shutil.copytree(root / "runs" / "two-workers", root / "runs" / name)
        return root / "runs" / name
    return copy


def faults(tmp_path: Path, spec: str, **extra: str) -> dict:
    # Ray folds repeated log lines ("[repeated 2x across cluster]"); the tests count them.
    return {"CHARNN_FAULTS": spec, "CHARNN_FAULT_DIR": str(tmp_path), "RAY_DEDUP_LOGS": "0", **extra}


def smoke_args(root: Path, name: str, *extra: str) -> list[str]:
    """jobs/train.py's arguments for run ``name``, set as ``train_smoke`` sets them (the reference's)."""
    return ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{root / 'corpus'}]",
            "--set", f"data.dataset_root={root / 'datasets'}", "--set", f"run.storage={root / 'runs'}",
            "--set", f"run.name={name}", "--set", "cluster.num_workers=2",
            "--set", f"train.batch_per_worker={SMOKE_ROWS // 2}", "--set", f"train.steps={STEPS}",
            "--set", "train.log_every=1", "--set", "train.checkpoint_every=0", "--set", "train.validate_every=0",
            "--set", "model.dropout=0.0", *extra]


def job_env(extra: dict) -> dict:
    """The environment of a job that starts its own embedded Ray, as a user's would."""
    env = {**os.environ, **FAST_TRAIN_ENV, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for(marker: Path, job: subprocess.Popen, seconds: float = 300) -> None:
    """Wait until a fault's marker file appears (the fault fired) while ``job`` runs."""
    deadline = time.time() + seconds
    while not marker.exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.2)


def resumed_at(output: str, name: str) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed {re.escape(name)} at step (\d+)/", output)]


@pytest.fixture(scope="module")
def killed(root, tmp_path_factory) -> tuple:
    """A run whose workers are SIGKILLed after step 15 and while saving the checkpoint of step 20."""
    markers = tmp_path_factory.mktemp("markers")
    proc, result = train_smoke(root, "killed", 2, STEPS, "--set", f"train.checkpoint_every={EVERY}",
                               "--set", "cluster.max_failures=3",
                               env=faults(markers, "kill@15:1,kill-in-checkpoint@20:1"))
    return proc, result, sorted(os.listdir(markers))


def test_workers_killed_mid_step_and_mid_checkpoint_are_restarted_and_resume(root, uninterrupted, killed, record_property):
    proc, result, fired = killed
    assert fired == ["kill-15-1", "kill-in-checkpoint-20-1"], "every fault fired once"
    resumes = resumed_at(proc.stdout, "killed")
    assert resumes == [10, 10], proc.stdout[-3000:]
    recomputed = [15 - 10, 20 - 10]
    assert max(recomputed) <= EVERY
    diff = same_run(root, "killed", result, ("two-workers", uninterrupted), STEPS)
    record_property("fault", {"fault": "SIGKILL a worker (mid-step, mid-checkpoint)", "injected": 2,
                              "recoveries": len(resumes), "steps recomputed": sum(recomputed),
                              "final loss vs uninterrupted": f"{diff:.1e}"})


def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(root, uninterrupted, killed, ray_cluster,
                                                                 record_property):
    import shutil

    shutil.copytree(root / "runs" / "killed", root / "runs" / "damaged")  # a finished run with 3 checkpoints
    newest = sorted(p for p in (root / "runs" / "damaged").glob("checkpoint_*") if p.is_dir())[-1]
    assert torch.load(newest / "model.pt", weights_only=True)["step"] == STEPS
    carry = next(newest.glob("carry-rows-*.pt"))
    carry.write_bytes(carry.read_bytes()[: carry.stat().st_size // 2])  # a truncated file

    proc, result = train_smoke(root, "damaged", 2, STEPS, "--set", f"train.checkpoint_every={EVERY}", cluster=ray_cluster)
    assert f"skipping checkpoint {newest}: {carry.name} does not match its checksum" in proc.stderr
    assert f"checkpoint {newest.name} is damaged" in proc.stdout and resumed_at(proc.stdout, "damaged") == [20]
    diff = same_run(root, "damaged", result, ("two-workers", uninterrupted), STEPS)
    record_property("fault", {"fault": "truncated file in the newest checkpoint", "injected": 1, "recoveries": 1,
                              "steps recomputed": STEPS - 20, "final loss vs uninterrupted": f"{diff:.1e}"})


def test_a_storage_outage_during_training_is_retried(root, uninterrupted, tmp_path, moto_s3, bucket, record_property):
    proxy = FlakyProxy(moto_s3.port).up()
    moto_s3.upload_dir(bucket, "corpus", root / "corpus")  # the same documents and keys: the same dataset
    args = ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[s3://{bucket}/corpus]",
            "--set", f"data.dataset_root=s3://{bucket}/datasets", "--set", f"run.storage=s3://{bucket}/runs",
            "--set", f"storage.endpoint_url=http://127.0.0.1:{proxy.port}", "--set", "run.name=outage",
            "--set", "cluster.num_workers=2", "--set", f"train.batch_per_worker={SMOKE_ROWS // 2}",
            "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", f"train.checkpoint_every={EVERY}",
            "--set", "train.validate_every=0", "--set", "model.dropout=0.0"]
    env = {**os.environ, **FAST_TRAIN_ENV, **faults(tmp_path, "pause@9:0", CHARNN_FAULT_PAUSE_S="3")}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "pause-9-0").exists():  # step 9 is done; the checkpoint of step 10 comes next
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.2)
    proxy.down()
    time.sleep(8)  # the storage is away while the checkpoint of step 10 is written
    proxy.up()
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-4000:]
    result = __import__("json").loads(out.strip().splitlines()[-1])
    assert result["steps"] == STEPS and resumed_at(out, "outage") == []
    assert result["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert result["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=1e-5)
    record_property("fault", {"fault": "S3 endpoint away for 8 s at a checkpoint", "injected": 1, "recoveries": 1,
                              "steps recomputed": 0,
                              "final loss vs uninterrupted": f"{abs(result['val_loss'] - uninterrupted['val_loss']):.1e}"})


def test_a_stopped_job_resubmitted_resumes(root, uninterrupted, tmp_path, ray_cluster, record_property):
    args = ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{root / 'corpus'}]",
            "--set", f"data.dataset_root={root / 'datasets'}", "--set", f"run.storage={root / 'runs'}",
            "--set", "run.name=stopped", "--set", "cluster.num_workers=2",
            "--set", f"train.batch_per_worker={SMOKE_ROWS // 2}", "--set", f"train.steps={STEPS}",
            "--set", "train.log_every=1", "--set", f"train.checkpoint_every={EVERY}", "--set", "train.validate_every=0",
            "--set", "model.dropout=0.0"]
    runtime_env = ["--runtime-env-json", __import__("json").dumps({"env_vars": faults(tmp_path, "pause@20:0")})]
    first = f"charnn-stop-{uuid.uuid4().hex[:8]}"
    command = ray_cluster.job_command(first, "train.py", *args, wait=False)
    command[command.index("--"):command.index("--")] = runtime_env
    subprocess.run(command, env=ray_cluster.env, check=True, capture_output=True, timeout=120)
    deadline = time.time() + 300
    while "charnn: step 20/30" not in ray_cluster.logs(first):
        assert time.time() < deadline, ray_cluster.logs(first)[-3000:]
        time.sleep(1)
    subprocess.run([ray_cluster.ray, "job", "stop", "--address", ray_cluster.address, first],
                   env=ray_cluster.env, check=True, capture_output=True, timeout=120)

    status, logs, result = ray_cluster.submit("train.py", *args)  # the same command again
    assert status == 0 and result["steps"] == STEPS, logs[-3000:]
    assert resumed_at(logs, "stopped") == [20]
    diff = same_run(root, "stopped", result, ("two-workers", uninterrupted), STEPS)
    record_property("fault", {"fault": "`ray job stop`, then the same job again", "injected": 1, "recoveries": 1,
                              "steps recomputed": 0, "final loss vs uninterrupted": f"{diff:.1e}"})


def _newest_cluster_on_the_machine(gcs_address: str):
    """Make the cluster at ``gcs_address`` the one that a Ray process with no RAY_ADDRESS finds (as a
    plain `ray start --head` does); returns how to undo it."""
    import tempfile

    address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    before = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(exist_ok=True)
    address_file.write_text(gcs_address)
    return lambda: address_file.write_text(before) if before is not None else address_file.unlink(missing_ok=True)


def _dashboard_behind(cluster, proxy: FlakyProxy) -> None:
    """Point the cluster's recorded dashboard address at ``proxy`` (which forwards to the real one);
    in a process of its own, with the cluster's token auth."""
    script = ("import sys\nfrom ray._private import ray_constants\nfrom ray._raylet import GcsClient\n"
              "GcsClient(address=sys.argv[1]).internal_kv_put(ray_constants.DASHBOARD_ADDRESS.encode(), "
              "sys.argv[2].encode(), True, ray_constants.KV_NAMESPACE_DASHBOARD)\n")
    subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{cluster.gcs_port}", f"127.0.0.1:{proxy.port}"],
                   env=cluster.env, check=True, capture_output=True, timeout=120)


def test_another_ray_cluster_on_the_machine_cannot_end_a_run(root, uninterrupted, tmp_path, record_property):
    """Ray Train's placement-group cleaner asks whether its controller lives through Ray's state API; a
    worker with no RAY_ADDRESS asks the newest cluster on the machine.  Here another cluster becomes
    the newest while it starts up (its dashboard does not answer yet), and answers once the run is
    training: it knows no such controller.  charnn's workers are told their own cluster, so the run
    goes on and ends as the uninterrupted run does."""
    import tempfile

    from support.servers import RayCluster

    with tempfile.TemporaryDirectory(prefix="charnn-other-", ignore_cleanup_errors=True) as other_dir:
        other = RayCluster(Path(other_dir)).start()
        dashboard = FlakyProxy(other.dashboard)  # down: the other cluster is still starting
        undo = _newest_cluster_on_the_machine(f"127.0.0.1:{other.gcs_port}")
        try:
            _dashboard_behind(other, dashboard)
            job = subprocess.Popen(
                [sys.executable, str(REPO / "jobs" / "train.py"), *smoke_args(root, "two-rays")], cwd=REPO,
                env=job_env(faults(tmp_path, "pause@5:0", CHARNN_FAULT_PAUSE_S="8")),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(tmp_path / "pause-5-0", job)
            dashboard.up()  # the other cluster answers now, while our run trains
            out, err = job.communicate(timeout=600)
        finally:
            undo()
            other.stop()
    assert job.returncode == 0 and "placement group was removed" not in err, err[-3000:]
    result = __import__("json").loads(out.strip().splitlines()[-1])
    diff = same_run(root, "two-rays", result, ("two-workers", uninterrupted), STEPS)
    record_property("fault", {"fault": "another Ray cluster on the machine answers Ray Train's liveness check",
                              "injected": 1, "recoveries": "none needed", "steps recomputed": 0,
                              "final loss vs uninterrupted": f"{diff:.1e}"})


def error_lines(stderr: str) -> list[str]:
    """The driver's own error lines (Ray forwards its workers' tracebacks, prefixed "(... pid=...)")."""
    driver = [line for line in stderr.splitlines() if not line.startswith(("(", "\x1b"))]
    assert not any(line.startswith("Traceback") for line in driver), "\n".join(driver)[-3000:]
    return [line for line in driver if line.startswith("charnn: error:")]


def test_a_worker_error_once_failures_are_exhausted_is_one_line_and_exit_1(root, tmp_path, ray_cluster,
                                                                         record_property):
    """N-2: Ray 2.60's fit() raises WorkerGroupError; the driver turns it into one line."""
    proc, _ = train_smoke(root, "exhausted", 2, STEPS, "--set", "cluster.max_failures=0", check=False,
                          env=faults(tmp_path, "raise@3:1"), cluster=ray_cluster)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == ["charnn: error: training failed: InjectedFault: injected fault raise@3:1 "
                                        "on rank 1"]
    record_property("fault", {"fault": "a worker raises, cluster.max_failures=0", "injected": 1, "recoveries": 0,
                              "steps recomputed": "-", "final loss vs uninterrupted": "exit 1, one line"})


def test_a_workers_own_error_keeps_its_line_and_exit_status(root, finished_copy, ray_cluster, record_property):
    """N-2: the only checkpoint of a run, which Ray Train registered, is damaged: rank 0 raises charnn's
    CheckpointError on the worker, and the job ends with that line and status 2."""
    run = finished_copy("damaged-only")
    for carry in run.glob("checkpoint_*/carry-rows-*.pt"):
        carry.write_bytes(carry.read_bytes()[:100])
    proc, _ = train_smoke(root, "damaged-only", 2, STEPS, check=False, cluster=ray_cluster)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line.startswith("charnn: error: checkpoint checkpoint_000000030_") and "is damaged and no earlier one " \
        f"is good; delete {run} to start over" in line
    record_property("fault", {"fault": "the run's only checkpoint damaged", "injected": 1, "recoveries": 0,
                              "steps recomputed": "-", "final loss vs uninterrupted": "exit 2, one line"})


def test_a_diverged_run_stops_before_it_saves_anything(root, ray_cluster, record_property):
    """N-3: a learning rate that sends the loss to inf stops the run on every rank, with one line and
    status 2, and no checkpoint of non-finite weights exists to be resumed or published."""
    proc, _ = train_smoke(root, "diverged", 2, STEPS, "--set", "train.lr=1e36", "--set", "train.checkpoint_every=10",
                          check=False, cluster=ray_cluster)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line.startswith("charnn: error: training diverged: ") and "lower train.lr" in line
    assert not list((root / "runs" / "diverged").glob("checkpoint_*"))
    record_property("fault", {"fault": "the loss diverges (train.lr=1e36)", "injected": 1, "recoveries": 0,
                              "steps recomputed": "-", "final loss vs uninterrupted": "exit 2, nothing saved"})


def test_a_driver_killed_outright_and_submitted_again_resumes_its_run_alone(root, uninterrupted, tmp_path,
                                                                          ray_cluster, record_property):
    """F-5 and the resume seen to differ: the driver is SIGKILLed after the checkpoint of step 20 while
    its workers still run; the same job, submitted at once, takes the run over (the dead driver's lease
    names a process that is gone), and the old attempt's workers never save into it again."""
    args = smoke_args(root, "driver-killed", "--set", f"train.checkpoint_every={EVERY}")
    env = {**job_env(faults(tmp_path, "pause@20:0", CHARNN_FAULT_PAUSE_S="15")), **ray_cluster.driver_env}
    first = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "pause-20-0", first)
    first.kill()
    first.communicate()
    proc, result = train_smoke(root, "driver-killed", 2, STEPS, "--set", f"train.checkpoint_every={EVERY}",
                               cluster=ray_cluster)
    assert resumed_at(proc.stdout, "driver-killed") == [20]
    # the killed job's paused rank wakes 15 s after the kill: had it lived on, it would have saved step 30 too
    saved = sorted(p.name.split("_")[1] for p in (root / "runs" / "driver-killed").glob("checkpoint_*") if p.is_dir())
    assert saved == ["000000010", "000000020", "000000030"], saved
    diff = same_run(root, "driver-killed", result, ("two-workers", uninterrupted), STEPS)
    record_property("fault", {"fault": "driver SIGKILLed, the same job submitted again at once", "injected": 1,
                              "recoveries": 1, "steps recomputed": 0, "final loss vs uninterrupted": f"{diff:.1e}"})
