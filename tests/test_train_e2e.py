"""jobs/train.py and jobs/generate.py end to end, as a user runs them, on an embedded local Ray."""
import os

import pytest
import torch

from conftest import run_job, write_corpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    write_corpus(root / "corpus", documents=10, lines=150, seed=3)
    proc, result = run_job(
        "train.py", "--spec", "jobs/specs/smoke.yaml",
        "--set", f"data.sources=[{root / 'corpus'}]",
        "--set", f"data.dataset_root={root / 'datasets'}",
        "--set", f"run.storage={root / 'runs'}",
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


def test_train_rejects_a_bad_spec_key_before_starting_ray(tmp_path):
    proc, _ = run_job("train.py", "--spec", "jobs/specs/smoke.yaml", "--set", "train.stesp=3", check=False)
    assert proc.returncode == 2
    assert "unknown key 'train.stesp'" in proc.stderr and "did you mean 'train.steps'" in proc.stderr
    assert "Traceback" not in proc.stderr
