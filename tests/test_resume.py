"""Resume checks what it resumes: the data and settings it continues, the checkpoint it ends
on, the order of checkpoints, and a store that is briefly unreadable (audit F-5, F-6, F-7,
F-11, F-24, F-25, F-27)."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from support.jobs import run_job, train_smoke, write_corpus
from support.servers import FlakyProxy
from charnn.storage import Store
from charnn.checkpoint import CheckpointError, latest_checkpoint, load_model, load_row_states

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def root(smoke_root) -> Path:
    return smoke_root


@pytest.fixture(scope="module")
def finished(root, two_workers) -> str:
    """The uninterrupted 30-step run ("two-workers"): one checkpoint, at step 30."""
    return "two-workers"


def copy_run(root: Path, run: str, name: str) -> Path:
    shutil.copytree(root / "runs" / run, root / "runs" / name)
    return root / "runs" / name


def test_checkpoints_are_named_by_step(root, finished):
    (checkpoint,) = [p.name for p in (root / "runs" / finished).glob("checkpoint_*") if p.is_dir()]
    assert checkpoint.startswith("checkpoint_000000030_"), checkpoint


def test_other_settings_or_too_few_steps_are_refused_before_ray_starts(root, finished):
    copy_run(root, finished, "other-settings")
    proc, _ = train_smoke(root, "other-settings", 2, 40, "--set", "train.lr=0.02", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "run other-settings was trained with other train.lr (0.01 now 0.02)" in proc.stderr
    assert "--set run.resume=force" in proc.stderr and "Started a local Ray" not in proc.stderr
    proc, _ = train_smoke(root, "other-settings", 2, 20, check=False)
    assert proc.returncode == 2 and "is at step 30, past train.steps=20" in proc.stderr


def test_other_data_is_refused_and_force_resumes_anyway(root, finished, ray_cluster):
    copy_run(root, finished, "other-data")
    corpus = root / "corpus-grown"
    shutil.copytree(root / "corpus", corpus)
    write_corpus(corpus, 1, 14, seed=99, prefix="added")
    grown = ("--set", f"data.sources=[{corpus}]")
    proc, _ = train_smoke(root, "other-data", 2, 32, *grown, check=False, cluster=ray_cluster)
    assert proc.returncode == 2 and "was trained with other the data" in proc.stderr
    proc, result = train_smoke(root, "other-data", 2, 32, *grown, "--set", "run.resume=force", cluster=ray_cluster)
    assert "resuming other-data despite other the data" in proc.stderr
    assert "resumed other-data at step 30/32" in proc.stdout and result["steps"] == 32


def test_a_final_checkpoint_that_ray_never_registered_is_the_result(root, finished, ray_cluster):
    """A worker died after all ranks saved the final checkpoint and before Ray Train registered
    it: a rerun resumes at the end, and its result is that checkpoint, not an earlier one or None."""
    run = copy_run(root, finished, "orphan")
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"] = [], []
    snapshot["latest_checkpoint_result"] = None
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    (final,) = [p for p in run.glob("checkpoint_*") if p.is_dir()]
    proc, result = train_smoke(root, "orphan", 2, 30, cluster=ray_cluster)
    assert result["steps"] == 30 and result["checkpoint"] == str(final), proc.stdout[-2000:]
    assert result["val_loss"] == pytest.approx(
        torch.load(final / "model.pt", weights_only=True)["metrics"]["val_loss"])


def test_a_record_that_ray_cannot_read_is_set_aside(root, finished, ray_cluster):
    run = copy_run(root, finished, "bad-record")
    (run / "checkpoint_manager_snapshot.json").write_text('{"ray_version": "2.60.0", "checkpoint_res')
    proc, result = train_smoke(root, "bad-record", 2, 30, cluster=ray_cluster)
    assert "Ray Train's record of" in proc.stderr and "is unusable (it cannot be read" in proc.stderr
    assert result["steps"] == 30 and list(run.glob("checkpoint_manager_snapshot.json.unusable-*"))


def test_a_store_briefly_unreadable_is_read_again_not_taken_for_damage(root, finished, moto_s3, bucket):
    (checkpoint,) = [p for p in (root / "runs" / finished).glob("checkpoint_*") if p.is_dir()]
    client = moto_s3.client()
    for path in checkpoint.iterdir():
        client.upload_file(str(path), bucket, f"runs/r/{checkpoint.name}/{path.name}")
    proxy = FlakyProxy(moto_s3.port).up()
    storage = Store(endpoint_url=f"http://127.0.0.1:{proxy.port}", max_attempts=1)  # no botocore retries
    proxy.down()
    threading.Timer(2.5, proxy.up).start()  # back while the reader waits between attempts
    started = time.monotonic()
    assert latest_checkpoint(f"s3://{bucket}/runs/r", storage) == f"s3://{bucket}/runs/r/{checkpoint.name}"
    assert time.monotonic() - started >= 2


def test_an_unreachable_run_storage_is_one_line(tmp_path):
    from support.servers import free_port

    proc, _ = run_job("train.py", "--spec", "jobs/specs/smoke.yaml", "--set", "run.storage=s3://nowhere/runs",
                      "--set", f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "--set", "storage.max_attempts=1",
                      check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("charnn: error:")]
    assert "cannot list the checkpoints of s3://nowhere/runs/smoke" in line


def test_checkpoints_that_lie_about_their_shape_or_files_are_one_line(root, finished, tmp_path):
    (checkpoint,) = [p for p in (root / "runs" / finished).glob("checkpoint_*") if p.is_dir()]
    payload = torch.load(checkpoint / "model.pt", weights_only=True)
    cases = {"extra-key": {**payload, "shape": {**payload["shape"], "colour": 1}},
             "huge": {**payload, "shape": {**payload["shape"], "cell_size": 10**9}},
             "mismatch": {**payload, "model": {k: v[:1] for k, v in payload["model"].items()}}}
    for name, broken in cases.items():
        (tmp_path / name).mkdir()
        torch.save(broken, tmp_path / name / "model.pt")
        with pytest.raises(CheckpointError) as info:
            load_model(str(tmp_path / name))
        assert "\n" not in str(info.value) and "use another checkpoint" in str(info.value), name
    (tmp_path / "carry").mkdir()
    (tmp_path / "carry" / "carry-rows-x-y.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a carry file"):
        load_row_states(str(tmp_path / "carry"), range(0, 4))
