"""jobs/train.py and jobs/generate.py end to end, as a user runs them, on an embedded local Ray."""
import os

import pytest
import torch

from support.jobs import run_job, write_corpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    write_corpus(root / "corpus", documents=10, lines=150, seed=3)
    proc, result = run_job(
        "train.py", "--spec", "jobs/specs/smoke.yaml",
        "--set", f"data.sources=[{root / 'corpus'}]",
        "--set", f"data.dataset_root={root / 'datasets'}",
        "--set", f"run.storage={root / 'runs'}", "--set", "train.sample_every=30",
    )
    return root, proc, result


def test_train_job_trains_and_prints_a_json_result(smoke_run):
    root, proc, result = smoke_run
    assert set(result) >= {"run", "checkpoint", "steps", "train_loss", "val_loss", "tokens_per_s"}
    assert result["run"] == "smoke" and result["steps"] == 60
    assert result["train_loss"] < result["first_loss"] - 0.5, "the loss did not decrease"
    assert result["val_loss"] < 4.0  # ln(98) = 4.58 is a uniform guess
    assert "charnn: sample:" in proc.stdout


def test_checkpoint_holds_weights_states_and_the_resolved_spec(smoke_run):
    root, _, result = smoke_run
    checkpoint = result["checkpoint"]
    files = sorted(os.listdir(checkpoint))
    assert "model.pt" in files and "optimizer.pt" in files
    assert [f for f in files if f.startswith("carry-rows-")] == ["carry-rows-000000-000004.pt", "carry-rows-000004-000008.pt"]
    payload = torch.load(os.path.join(checkpoint, "model.pt"), weights_only=True)
    assert payload["step"] == 60 and payload["alphabet"] == "gorner98"
    assert "cell_size: 32" in payload["spec"]
    assert (root / "runs" / "smoke" / "spec.yaml").read_text() == payload["spec"]


def test_run_directory_has_tensorboard_scalars_samples_and_a_loss_plot(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = smoke_run
    events = EventAccumulator(str(root / "runs" / "smoke" / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in ("loss", "accuracy", "bpc", "lr", "tokens_per_s", "grad_norm")} <= scalars
    assert {"val/loss", "val/accuracy", "val/bpc"} <= scalars
    assert [e.step for e in events.Scalars("val/loss")] == [30, 60]
    assert any(tag.startswith("sample") for tag in events.Tags()["tensors"])
    assert (root / "runs" / "smoke" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_loads_the_checkpoint_and_is_reproducible(smoke_run):
    _, _, result = smoke_run
    args = ["--checkpoint", result["checkpoint"], "--prime", "To be", "--length", "120", "--top-k", "5"]
    first, _ = run_job("generate.py", *args, "--seed", "7")
    again, _ = run_job("generate.py", *args, "--seed", "7")
    other, _ = run_job("generate.py", *args, "--seed", "8")
    assert len(first.stdout.rstrip("\n")) >= 100
    assert first.stdout == again.stdout != other.stdout


@pytest.mark.parametrize("args, message", [
    (["--length", "0"], "--length must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-k", "99"], "--top-k must lie in 0..98"),
])
def test_generate_rejects_bad_options(smoke_run, args, message):
    _, _, result = smoke_run
    proc, _ = run_job("generate.py", "--checkpoint", result["checkpoint"], *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_names_a_missing_checkpoint(tmp_path):
    proc, _ = run_job("generate.py", "--checkpoint", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr


def test_generate_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 not a torch archive")
    proc, _ = run_job("generate.py", "--checkpoint", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is not a readable charnn checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_warns_about_prime_characters_outside_the_alphabet(smoke_run):
    _, _, result = smoke_run
    proc, _ = run_job("generate.py", "--checkpoint", result["checkpoint"], "--prime", "Über naïve", "--length", "20")
    assert "--prime has 2 characters outside the alphabet" in proc.stderr and len(proc.stdout.strip()) >= 20


def test_train_rejects_a_bad_spec_key_before_starting_ray(tmp_path):
    proc, _ = run_job("train.py", "--spec", "jobs/specs/smoke.yaml", "--set", "train.stesp=3", check=False)
    assert proc.returncode == 2
    assert "unknown key 'train.stesp'" in proc.stderr and "did you mean 'train.steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoints_and_run_files_in_s3(tmp_path, moto_s3, bucket, ray_cluster):
    write_corpus(tmp_path / "corpus", documents=6, lines=60, seed=4)
    source = moto_s3.upload_dir(bucket, "corpus", tmp_path / "corpus")
    _, result = run_job(
        "train.py", "--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{source}]",
        "--set", f"data.dataset_root=s3://{bucket}/datasets", "--set", f"run.storage=s3://{bucket}/runs",
        "--set", f"storage.endpoint_url={moto_s3.endpoint}", "--set", "train.steps=20", cluster=ray_cluster,
    )
    assert result["checkpoint"].startswith(f"s3://{bucket}/runs/smoke/checkpoint_")
    keys = {o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="runs/smoke/")["Contents"]}
    prefix = result["checkpoint"][len(f"s3://{bucket}/"):]
    assert {f"{prefix}/model.pt", f"{prefix}/optimizer.pt", "runs/smoke/spec.yaml", "runs/smoke/loss.png"} <= keys
    assert any(k.startswith("runs/smoke/tensorboard/events.") for k in keys)
    args = ["--checkpoint", result["checkpoint"], "--endpoint-url", moto_s3.endpoint, "--length", "50", "--seed", "3"]
    first, _ = run_job("generate.py", *args)
    again, _ = run_job("generate.py", *args)
    assert len(first.stdout.strip()) > 0 and first.stdout == again.stdout


def test_use_gpu_on_a_cluster_without_gpus_fails_fast_and_writes_nothing(tmp_path):
    proc, _ = run_job("train.py", "--spec", "jobs/specs/smoke.yaml", "--set", "cluster.use_gpu=true",
                      "--set", f"run.storage={tmp_path / 'runs'}", "--set", f"data.dataset_root={tmp_path / 'datasets'}",
                      check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the cluster cannot place 2 workers: they need 2 GPU (it has 0); set cluster.use_gpu=false" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "datasets").exists()


def test_credentials_never_reach_logs_records_or_the_result(tmp_path):
    """A source URL with a password, and AWS keys in the environment: none of them may be echoed."""
    import functools
    import http.server
    import threading

    from support.jobs import write_corpus

    write_corpus(tmp_path / "site" / "plays", documents=1, lines=300)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    password, key_id, secret = "FAKEpassword7781", "AKIAFAKEFAKEFAKE7781", "FAKEsecretAccessKey7781"
    source = f"http://charnn:{password}@127.0.0.1:{server.server_address[1]}/plays/doc-000.txt"
    try:
        proc, result = run_job("train.py", "--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{source}]",
                               "--set", f"run.storage={tmp_path / 'runs'}", "--set", f"data.dataset_root={tmp_path / 'datasets'}",
                               "--set", "train.steps=10", env={"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
    finally:
        server.shutdown()
    assert result["steps"] == 10
    records = [p for p in tmp_path.rglob("*") if p.is_file() and "site" not in p.parts]
    assert any(p.name == "spec.yaml" for p in records) and any(p.name == "manifest.json" for p in records)
    assert "http://***@127.0.0.1" in (tmp_path / "runs" / "smoke" / "spec.yaml").read_text()
    for text in [proc.stdout, proc.stderr, *(p.read_bytes().decode("latin-1") for p in records)]:
        for value in (password, key_id, secret):
            assert value not in text
