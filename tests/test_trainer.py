"""The Trainer itself, in this process (``LocalContext``, no Ray Train): the loop the workers run,
its checkpoints, its records, an exact resume, and a time budget."""
from __future__ import annotations

import json

import pytest
import torch

from charnn.spec_loader import load_spec
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.runners import InProcess
from charnn.storage import Store
from charnn.train.context import LocalContext
from charnn.train.metrics import read_points
from charnn.train.trainer import Trainer
from support.jobs import write_corpus



def smoke(tmp_path, name: str, *overrides: str):
    return load_spec("jobs/specs/smoke.yaml", [
        f"data.sources=[{tmp_path / 'corpus'}]", f"data.dataset_root={tmp_path / 'datasets'}",
        f"run.storage={tmp_path / 'runs'}", f"run.name={name}", "cluster.num_workers=1",
        "train.batch_per_worker=4", "train.log_every=1", "model.dropout=0.0", *overrides])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny dataset, built in this process (no Ray, as the training)."""
    root = tmp_path_factory.mktemp("local")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root, build_dataset(DatasetRequest.from_spec(smoke(root, "any")), runner=InProcess()).url


def train(root, name: str, *overrides: str):
    spec = smoke(root, name, *overrides)
    context = LocalContext(str(root / "runs" / name), Store())
    return Trainer(spec, dataset_url(root), context).train(), context


def dataset_url(root) -> str:
    (manifest,) = (root / "datasets").glob("*/versions/*/manifest.json")
    return str(manifest.parent)


def test_the_loop_trains_checkpoints_and_records_without_ray(dataset):
    root, _ = dataset
    state, context = train(root, "local", "train.steps=20", "train.checkpoint_every=10", "train.validate_every=10")
    assert state.step == 20 and [r["step"] for r in context.reports] == [10, 20]
    # the last report carries what the job's result prints, so that the driver reads nothing back
    assert "sample" not in context.reports[0] and context.reports[-1]["workers"] == [[0, 1]]
    assert len(context.reports[-1]["sample"]) == 80  # smoke.yaml's train.sample_length
    points = read_points(Store(), str(root / "runs" / "local"))
    assert [p.step for p in points["val"]] == [10, 20] and len(points["train"]) == 20
    assert points["train"][-1].loss < points["train"][0].loss
    checkpoints = sorted(p.name for p in (root / "runs" / "local").glob("checkpoint_*"))
    assert [c[:20] for c in checkpoints] == ["checkpoint_000000010", "checkpoint_000000020"]
    assert json.loads((root / "runs" / "local" / checkpoints[-1] / "checksums-rank0000.json").read_text())["world"] == 1


def test_a_local_run_resumes_exactly(dataset):
    root, _ = dataset
    train(root, "whole", "train.steps=16", "train.checkpoint_every=8")
    train(root, "halves", "train.steps=8", "train.checkpoint_every=8")
    state, _ = train(root, "halves", "train.steps=16", "train.checkpoint_every=8")
    assert state.step == 16
    whole, halves = (read_points(Store(), str(root / "runs" / n))["train"] for n in ("whole", "halves"))
    assert [p.loss for p in halves] == pytest.approx([p.loss for p in whole], rel=1e-5)
    weights = [torch.load(sorted((root / "runs" / n).glob("checkpoint_000000016_*"))[0] / "model.pt",
                          weights_only=True)["model"] for n in ("whole", "halves")]
    for key, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][key], tensor, rtol=1e-5, atol=1e-7)


def test_a_time_budget_ends_the_run_and_paces_the_schedule(dataset):
    root, _ = dataset
    state, _ = train(root, "timed", "train.minutes=0.02", "train.log_every=5", "train.schedule=cosine",
                     "train.min_lr_ratio=0.1", "train.checkpoint_every=0")
    assert state.train_seconds >= 1.2 and state.step % 5 == 0
    last = read_points(Store(), str(root / "runs" / "timed"))["train"][-1]
    assert last.lr == pytest.approx(0.01 * 0.1, rel=0.05)  # the cosine has reached its floor with the time


def test_workers_of_a_job_whose_run_was_taken_over_never_save_into_it(dataset):
    """F-5: the driver's run lease reaches the workers; once another job holds a newer lease of the
    run (this job's driver froze past its lease), they stop at their next checkpoint without saving."""
    from charnn.train.checkpointer import RunBusy, RunDirectory

    root, _ = dataset
    run = root / "runs" / "taken-over"
    ours = RunDirectory(str(run), Store()).lease(60)
    ours.acquire()
    spec = smoke(root, "taken-over", "train.steps=20", "train.checkpoint_every=10")
    trainer = Trainer(spec, dataset_url(root), LocalContext(str(run), Store()), run_lease=ours.number)
    ours._stop.set()  # frozen: no more renewals
    (run / "lease" / f"{ours.number:06d}.json").write_text(json.dumps({"owner": "x", "expires": 0}))  # expired
    with RunDirectory(str(run), Store()).lease(60):  # another job took the run over
        with pytest.raises(RunBusy, match=r"another job took run .* over \(lease 2; this job holds 1\)"):
            trainer.train()
    assert not list(run.glob("checkpoint_*"))


def test_a_resume_between_progress_lines_reports_the_figures_of_the_run_that_never_stopped(dataset, tmp_path,
                                                                                        monkeypatch):
    """A resumed run's progress figures (and so its result's train_loss) are means over the steps since
    the last progress line: the checkpoint carries that open interval, so a run that stopped in the
    middle of one reports what the uninterrupted run reports (a resume before this differed there)."""
    from charnn.train.faults import InjectedFault

    root, _ = dataset
    settings = ("train.steps=16", "train.checkpoint_every=8", "train.log_every=6")
    state, _ = train(root, "whole-6", *settings)
    monkeypatch.setenv("CHARNN_FAULTS", "raise@10")
    monkeypatch.setenv("CHARNN_FAULT_DIR", str(tmp_path))
    with pytest.raises(InjectedFault):  # stopped after step 10: its newest checkpoint is step 8's
        train(root, "halves-6", *settings)
    resumed, _ = train(root, "halves-6", *settings)
    whole, halves = (read_points(Store(), str(root / "runs" / n))["train"] for n in ("whole-6", "halves-6"))
    assert [p.step for p in halves] == [p.step for p in whole] == [6, 12, 16]
    for ours, theirs in zip(halves, whole):
        assert ours.loss == pytest.approx(theirs.loss, rel=1e-5) and ours.accuracy == theirs.accuracy
    assert resumed.figures.train.loss == pytest.approx(state.figures.train.loss, rel=1e-5)
