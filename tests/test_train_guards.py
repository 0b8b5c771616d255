"""The Trainer's guards, in this process (``LocalContext``) on a dataset built without Ray: a
diverged run stops before it saves or reports non-finite figures (audit N-3), a time budget paces
every rank's schedule by one agreed clock (N-10), and a run resumed at its end from a checkpoint
without validation figures is finished properly (F-25)."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from charnn.checkpoint import latest_checkpoint, load_payload
from charnn.spec_loader import load_spec
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.runners import InProcess
from charnn.errors import UserError
from charnn.storage import Store
from charnn.train.context import LocalContext
from charnn.train.faults import InjectedFault
from charnn.train.metrics import TrainClock, read_points
from charnn.train.trainer import Trainer
from support.jobs import write_corpus

VAL_FIGURES = {"val_loss", "val_accuracy", "val_bpc"}


def smoke(root, name: str, *overrides: str):
    return load_spec("jobs/specs/smoke.yaml", [
        f"data.sources=[{root / 'corpus'}]", f"data.dataset_root={root / 'datasets'}",
        f"run.storage={root / 'runs'}", f"run.name={name}", "cluster.num_workers=1", "train.batch_per_worker=4",
        "model.cell_size=16", "model.layers=1", "train.log_every=1", "train.sample_every=0", *overrides])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny dataset, built in this process (no Ray, as the tests)."""
    root = tmp_path_factory.mktemp("guards")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root, build_dataset(DatasetRequest.from_spec(smoke(root, "any")), runner=InProcess()).url


def trainer(dataset, name: str, *overrides: str) -> Trainer:
    root, url = dataset
    return Trainer(smoke(root, name, *overrides), url, LocalContext(str(root / "runs" / name), Store()))


def checkpoints(dataset, name: str) -> list:
    return sorted((dataset[0] / "runs" / name).glob("checkpoint_*"))


def strict_json(line: str):
    """A JSON line as strict parsers read it: NaN and Infinity are not JSON."""
    return json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} in metrics.jsonl"))


# N-3: a diverged run


def assert_diverged_in_one_line(raised, step: int | None = None) -> None:
    error = raised.value
    assert type(error).__name__ == "TrainingDiverged" and error.exit_status == 2
    assert str(error).startswith("training diverged: ") and "\n" not in str(error)
    assert "train.lr" in str(error) and "run.name" in str(error)
    if step is not None:
        assert f"at step {step}" in str(error)


def assert_every_saved_figure_finite(dataset, name: str) -> None:
    for directory in checkpoints(dataset, name):
        payload = torch.load(directory / "model.pt", weights_only=True)
        assert all(torch.isfinite(tensor).all() for tensor in payload["model"].values()), directory.name
        assert all(math.isfinite(v) for v in payload["metrics"].values() if isinstance(v, float)), directory.name
    metrics = dataset[0] / "runs" / name / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        strict_json(line)


def test_a_huge_learning_rate_stops_the_run_before_any_non_finite_checkpoint(dataset):
    run = trainer(dataset, "huge-lr", "train.lr=1e36", "train.steps=40", "train.log_every=4",
                  "train.checkpoint_every=1", "train.validate_every=2")
    with pytest.raises(UserError) as raised:
        run.train()
    assert_diverged_in_one_line(raised)
    assert checkpoints(dataset, "huge-lr")  # stopped mid-run: what it saved before is kept, all of it finite
    assert all(math.isfinite(r.get("val_loss", 0.0)) for r in run.context.reports)
    assert_every_saved_figure_finite(dataset, "huge-lr")


def poison_weights_after(run: Trainer, step: int, value: float) -> None:
    """The weights turn ``value`` in the step after ``step`` (a step that syncs nothing)."""
    one_step, done = run.train_step, [0]

    def train_step(*args):
        figures = one_step(*args)
        done[0] += 1
        if done[0] == step + 1:
            with torch.no_grad():
                run.model.head.bias[3] = value
        return figures

    run.train_step = train_step


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_turn_non_finite_stop_the_run_at_the_next_step_that_syncs(dataset, value):
    name = f"poisoned-{value}"
    run = trainer(dataset, name, "train.steps=40", "train.log_every=5", "train.checkpoint_every=4",
                  "train.validate_every=0")
    poison_weights_after(run, 5, value)  # the weights turn in step 6: checkpoint 8 is the first turn to notice
    with pytest.raises(UserError) as raised:
        run.train()
    assert_diverged_in_one_line(raised, step=8)
    assert "weights" in str(raised.value)
    assert [c.name[:20] for c in checkpoints(dataset, name)] == ["checkpoint_000000004"]
    assert_every_saved_figure_finite(dataset, name)


# N-10: one agreed clock paces the schedule


class SteppedClock(TrainClock):
    """A training clock that moves only when the test moves it (``now``)."""

    def __init__(self):
        super().__init__()
        self.now = 0.0

    def seconds(self) -> float:
        return self.before + self.now

    @contextlib.contextmanager
    def paused(self):
        self.before, self.now = self.seconds(), 0.0
        yield


def run_on_a_stepped_clock(run: Trainer, seconds_per_step: float) -> list[float]:
    """Train ``run`` with its clock moving ``seconds_per_step`` in each step; the learning rate
    that each step leaves for the next."""
    run.clock, one_step, rates = SteppedClock(), run.train_step, []

    def train_step(*args):
        figures = one_step(*args)
        run.clock.now += seconds_per_step
        rates.append(run.parts.optimizer.param_groups[0]["lr"])
        return figures

    run.train_step = train_step
    with contextlib.suppress(InjectedFault):
        run.train()
    return rates


BUDGET = ["train.minutes=0.0125", "train.schedule=cosine", "train.min_lr_ratio=0.1", "train.log_every=4",
          "train.validate_every=0"]  # 0.75 s of training clock


def test_under_a_time_budget_the_learning_rate_moves_only_at_log_steps(dataset):
    run = trainer(dataset, "paced", *BUDGET, "train.checkpoint_every=0")
    rates = run_on_a_stepped_clock(run, 0.0625)
    moved = [i for i in range(1, len(rates)) if rates[i] != rates[i - 1]]
    # rates[i] is set by step i + 1, which follows a log step (one that agrees the clock) when i % 4 == 0
    assert moved and all(i % 4 == 0 for i in moved), moved
    assert rates[-1] < rates[0] and len(rates) % 4 == 0 and 12 <= len(rates) <= 16
    last = read_points(Store(), str(dataset[0] / "runs" / "paced"))["train"][-1]
    assert last.lr == pytest.approx(0.01 * 0.1)  # the budget is spent: the cosine is at its floor


def test_a_resumed_time_budget_paces_from_the_checkpoints_training_clock(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_FAULTS", "raise@6")
    monkeypatch.setenv("CHARNN_FAULT_DIR", str(tmp_path))
    first = run_on_a_stepped_clock(trainer(dataset, "paced-resumed", *BUDGET, "train.checkpoint_every=4"), 0.0625)
    assert len(first) == 6  # stopped after step 6; checkpoint 4 holds 0.25 s of training clock
    resumed = run_on_a_stepped_clock(trainer(dataset, "paced-resumed", *BUDGET, "train.checkpoint_every=4"), 0.0625)
    assert resumed[0] == first[4]  # step 5 paced by the clock of step 4, as in the first attempt


# F-25: resumed at its end from a checkpoint without validation figures


@pytest.mark.parametrize("end", [("train.steps=6", "train.steps=2"), ("train.minutes=10.0", "train.minutes=1e-06")],
                         ids=["steps", "minutes"])
def test_a_run_resumed_at_its_end_without_validation_figures_is_validated_and_saved(dataset, end, tmp_path,
                                                                                    monkeypatch):
    name, cadence = f"ended-{end[1].split('=')[0]}", ("train.checkpoint_every=2", "train.validate_every=0")
    monkeypatch.setenv("CHARNN_FAULTS", "raise@3")
    monkeypatch.setenv("CHARNN_FAULT_DIR", str(tmp_path))
    with pytest.raises(InjectedFault):
        trainer(dataset, name, end[0], *cadence).train()  # stopped after checkpoint 2, which is not a final one
    assert not VAL_FIGURES & load_payload(latest_checkpoint(str(dataset[0] / "runs" / name)))["metrics"].keys()
    run = trainer(dataset, name, end[1], *cadence)
    state = run.train()
    final = load_payload(latest_checkpoint(str(dataset[0] / "runs" / name)))
    assert state.step == final["step"] == 2 and VAL_FIGURES <= final["metrics"].keys()
    assert VAL_FIGURES <= run.context.reports[-1].keys() and VAL_FIGURES <= state.figures.to_metrics().keys()
    assert [p.step for p in read_points(Store(), str(dataset[0] / "runs" / name))["val"]] == [2]
    saved = checkpoints(dataset, name)
    again = trainer(dataset, name, end[1], *cadence)
    assert again.train().figures.val.loss == final["metrics"]["val_loss"]  # finished: reported, not redone
    assert checkpoints(dataset, name) == saved and VAL_FIGURES <= again.context.reports[-1].keys()
