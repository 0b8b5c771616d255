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
from support.jobs import SMOKE_ROWS, tb_losses, train_smoke
from support.servers import FlakyProxy

pytestmark = [pytest.mark.ray, pytest.mark.faults]
STEPS, EVERY = 30, 10


@pytest.fixture(scope="module")
def root(smoke_root) -> Path:
    return smoke_root


@pytest.fixture(scope="module")
def uninterrupted(two_workers) -> dict:
    return two_workers


def faults(tmp_path: Path, spec: str, **extra: str) -> dict:
    # Ray folds repeated log lines ("[repeated 2x across cluster]"); the tests count them.
    return {"CHARNN_FAULTS": spec, "CHARNN_FAULT_DIR": str(tmp_path), "RAY_DEDUP_LOGS": "0", **extra}


def resumed_at(output: str, name: str) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed {re.escape(name)} at step (\d+)/", output)]


def same_run(root: Path, name: str, result: dict, uninterrupted: dict) -> float:
    """Assert that run ``name`` ended as the uninterrupted run did; returns the final-loss difference."""
    full, ours = tb_losses(root, "two-workers"), tb_losses(root, name)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in full:
        assert ours[step] == pytest.approx(full[step], rel=1e-5), step
    saved = torch.load(f"{result['checkpoint']}/model.pt", weights_only=True)
    reference = torch.load(f"{uninterrupted['checkpoint']}/model.pt", weights_only=True)
    for key, tensor in reference["model"].items():
        torch.testing.assert_close(saved["model"][key], tensor, rtol=1e-5, atol=1e-7)
    return abs(result["val_loss"] - uninterrupted["val_loss"])


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
    diff = same_run(root, "killed", result, uninterrupted)
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
    diff = same_run(root, "damaged", result, uninterrupted)
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
    diff = same_run(root, "stopped", result, uninterrupted)
    record_property("fault", {"fault": "`ray job stop`, then the same job again", "injected": 1, "recoveries": 1,
                              "steps recomputed": 0, "final loss vs uninterrupted": f"{diff:.1e}"})
