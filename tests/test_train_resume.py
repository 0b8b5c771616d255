"""Carried state, W-invariance and exact resume, through jobs/train.py joined to a real `ray start` cluster.

Every run trains the smoke model with dropout 0 and logs the global train loss every step
to TensorBoard; runs are compared on those curves.
"""
import functools

import pytest
import torch

from support.jobs import tb_losses as losses, train_smoke

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def root(smoke_root):
    return smoke_root


@pytest.fixture(scope="module")
def train(ray_cluster):
    """train_smoke, joined to the session's `ray start` cluster."""
    return functools.partial(train_smoke, cluster=ray_cluster)


@pytest.fixture(scope="module")
def uninterrupted(root, two_workers, train):
    _, one = train(root, "one-worker", 1, 30)
    return one, two_workers


def test_loss_curve_does_not_depend_on_how_rows_are_split(root, uninterrupted):
    one, two = losses(root, "one-worker"), losses(root, "two-workers")
    assert sorted(one) == list(range(1, 31))
    assert one[30] < one[1]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert uninterrupted[0]["epoch"] >= 1, "the run must cross an epoch boundary"


@pytest.fixture(scope="module")
def partial(root, train) -> str:
    """A run stopped after 12 of 30 steps (2 workers); tests resume copies of it."""
    _, first = train(root, "partial", 2, 12)
    assert first["steps"] == 12
    return "partial"


def resume_copy(root, partial: str, name: str) -> None:
    import shutil

    shutil.copytree(root / "runs" / partial, root / "runs" / name)


def test_exact_resume_continues_with_the_carried_state(root, uninterrupted, partial, train):
    resume_copy(root, partial, "resumed")
    proc, second = train(root, "resumed", 2, 30)
    assert "resumed resumed at step 12/30" in proc.stdout
    full, resumed = losses(root, "two-workers"), losses(root, "resumed")
    for step in range(13, 31):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    saved = torch.load(f"{second['checkpoint']}/model.pt", weights_only=True)
    reference = torch.load(f"{uninterrupted[1]['checkpoint']}/model.pt", weights_only=True)
    for key, tensor in reference["model"].items():
        torch.testing.assert_close(saved["model"][key], tensor, rtol=1e-5, atol=1e-7)


def test_resume_on_another_number_of_workers(root, uninterrupted, partial, train):
    resume_copy(root, partial, "regrouped")
    proc, _ = train(root, "regrouped", 1, 30)
    assert "resumed regrouped at step 12/30" in proc.stdout
    full, resumed = losses(root, "one-worker"), losses(root, "regrouped")
    for step in range(13, 31):
        assert resumed[step] == pytest.approx(full[step], rel=1e-4), step


def test_a_spec_of_another_model_shape_is_refused_before_training(root, uninterrupted, train):
    proc, _ = train(root, "one-worker", 1, 40, "--set", "model.cell_size=48", check=False)
    assert proc.returncode == 2
    assert "checkpoint is a gorner98 model" in proc.stderr and "cell_size=32" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc, _ = train(root, "one-worker", 1, 40, "--set", "data.alphabet=bytes", check=False)
    assert proc.returncode == 2 and "the spec asks for bytes" in proc.stderr


def test_a_run_resumes_on_the_dataset_version_it_started_with_while_new_runs_get_the_grown_one(
        tmp_path, root, train):
    import shutil

    from support.jobs import write_corpus

    shutil.copytree(root / "corpus", tmp_path / "corpus")
    _, first = train(tmp_path, "grows", 2, 12)
    assert first["dataset"].endswith("/versions/v000001")
    write_corpus(tmp_path / "corpus", documents=2, lines=150, seed=77, prefix="added")
    proc, resumed = train(tmp_path, "grows", 2, 30)
    assert "resumed grows at step 12/30" in proc.stdout
    assert f"on the dataset version it started with, {first['dataset']}" in proc.stdout + proc.stderr
    assert resumed["dataset"] == first["dataset"] and resumed["steps"] == 30
    _, fresh = train(tmp_path, "fresh", 2, 2)
    assert fresh["dataset"] == first["dataset"].replace("v000001", "v000002")
