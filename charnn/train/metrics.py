"""What a run says about itself: progress and validation lines, TensorBoard scalars and samples,
``metrics.jsonl`` (one JSON object per logged point, what bench/quality.py reads) and a PNG of
the loss curves, all under the run's directory in ``run.storage``.

Figures are summed on the device between log lines (no host sync per step) and averaged over
all workers when a line is due; only rank 0 writes.  TensorBoard and the JSONL file are local
files, so for a cloud ``run.storage`` they are written to a staging folder that is copied up at
every report.  The loss history travels in the checkpoint, so a resumed run plots it whole.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from charnn.log import say
from charnn.storage import Store, basename, join
from charnn.train.figures import TrainFigures, ValFigures, tokens_per_s
from charnn.train.state import OpenInterval
from charnn.train.collectives import Collectives

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Point:
    """One line of ``metrics.jsonl``: a progress line's figures (split "train") or a validation's
    ("val") at ``step``.  The keys are those the file has always had, in its order; a figure a point
    lacks is None and not written, and keys this code does not know are kept as found (``extra``)."""

    split: str
    step: int
    loss: float | None = None
    accuracy: float | None = None
    bpc: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    grad_norm: float | None = None
    epoch: int | None = None
    train_seconds: float | None = None  # the training clock's, when the point was logged
    workers: int | None = None
    time: float | None = None  # POSIX time it was logged
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def of_train(cls, step: int, figures: TrainFigures, epoch: int, train_seconds: float, workers: int) -> "Point":
        return cls("train", step, figures.loss, figures.accuracy, figures.bpc, figures.lr, figures.tokens_per_s,
                   figures.grad_norm, epoch, train_seconds, workers, time.time())

    @classmethod
    def of_val(cls, step: int, figures: ValFigures, train_seconds: float) -> "Point":
        return cls("val", step, figures.loss, figures.accuracy, figures.bpc, train_seconds=train_seconds,
                   time=time.time())

    def scalars(self) -> dict[str, float]:
        """Its figures by name, as TensorBoard's ``<split>/<name>`` scalars."""
        names = [f.name for f in fields(self) if f.name not in ("split", "step", "time", "extra")]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in values.items() if v is not None} | self.extra

    @classmethod
    def from_dict(cls, raw: Any) -> "Point | None":
        """The point of a parsed line; None for what cannot be one (no integer step, no known split)."""
        if not isinstance(raw, dict) or raw.get("split") not in ("train", "val"):
            return None
        if not isinstance(raw.get("step"), int):
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in raw.items() if k in known},
                   extra={k: v for k, v in raw.items() if k not in known})


@dataclass
class TrainClock:
    """Seconds spent in training steps, across resumes; validation, samples and checkpoints
    pause it (bench/quality.py measures time-to-quality with it)."""

    before: float = 0.0
    since: float = field(default_factory=lambda: time.perf_counter())

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.since

    @contextlib.contextmanager
    def paused(self):
        self.before = self.seconds()
        yield
        self.since = time.perf_counter()


@dataclass
class Interval:
    """Train figures since the last log line, summed on the device (no host sync per step); its
    speed is over training time (``clock``), so a validation in between does not lower it."""

    clock: TrainClock
    loss: torch.Tensor | float = 0.0
    correct: torch.Tensor | float = 0.0
    count: int = 0
    steps: int = 0
    since: float = 0.0

    def __post_init__(self):
        self.since = self.clock.seconds()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss = self.loss + loss
        self.correct = self.correct + (logits.argmax(-1) == y).sum()
        self.count += y.numel()
        self.steps += 1

    def carried(self, group: Collectives) -> OpenInterval:
        """The interval so far, summed over every rank (a collective: every rank calls it, at
        checkpoint steps), for the checkpoint."""
        loss, correct, count = group.all_sum([float(self.loss), float(self.correct), self.count])
        return OpenInterval(loss, correct, int(count), self.steps, self.clock.seconds() - self.since)

    def resume(self, carried: OpenInterval | None, rank: int) -> None:
        """Continue the interval a checkpoint carried.  Rank 0 holds every rank's sums so far (the
        means of ``close`` sum over ranks, so each is counted once); every rank, its steps and time."""
        if carried is None:
            return
        if rank == 0:
            self.loss, self.correct, self.count = carried.loss, carried.correct, carried.count
        self.steps, self.since = carried.steps, self.clock.seconds() - carried.seconds

    def close(self, group: Collectives) -> dict:
        """Mean loss and accuracy over all workers, and this interval's speed; starts a new interval."""
        seconds, steps = self.clock.seconds() - self.since, self.steps
        loss, correct, count = group.all_sum([float(self.loss) / steps, float(self.correct), self.count])
        world = group.world
        self.__init__(self.clock)
        return {"loss": loss / world, "accuracy": correct / count, "tokens_per_s": tokens_per_s(count, seconds),
                "seconds_per_step": seconds / steps}


class RunLog:
    """Rank 0's files: TensorBoard, ``metrics.jsonl`` and ``loss.png``."""

    def __init__(self, run_url: str, store: Store, start_step: int, history: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_url, self.store = run_url, store
        local = store.local_path(run_url)
        self.remote = None if local is not None else run_url  # a cloud run.storage: staged here, copied up
        self.local = local if local is not None else tempfile.mkdtemp(prefix="charnn-run-")
        # purge_step drops events a crashed attempt wrote after the checkpoint we resume from (the
        # checkpoint step's own were logged before it was saved)
        self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.points = _points_until(store, join(run_url, METRICS_FILE), start_step)
        # the plot's losses are the points kept: one record of them, cut back to the resumed step once
        self.history = history if history is not None else {}
        for split in ("train", "val"):
            self.history[split] = [[p.step, p.loss] for p in self.points if p.split == split and p.loss is not None]

    def log(self, point: Point) -> None:
        for name, value in point.scalars().items():
            if math.isfinite(value):
                self.writer.add_scalar(f"{point.split}/{name}", value, point.step)
        self.points.append(point)
        if point.loss is not None:
            self.history[point.split].append([point.step, point.loss])

    def sample(self, step: int, text: str) -> None:
        self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # a code block keeps layout

    def flush(self) -> None:
        self.writer.flush()
        lines = "".join(json.dumps(p.to_dict()) + "\n" for p in self.points)
        self.store.write(join(self.run_url, METRICS_FILE), lines.encode(), durable=False)
        if self.remote is not None:
            self.store.put(os.path.join(self.local, "tensorboard"), join(self.remote, "tensorboard"))

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.store.write(join(self.run_url, "loss.png"), plot_losses(self.history, basename(self.run_url)))


def _points_until(store: Store, url: str, step: int) -> list[Point]:
    """The points an earlier attempt logged up to ``step`` (later ones it logged before it died
    are logged again)."""
    if not step or not store.exists(url):
        return []
    return [p for p in _parse_points(store.read(url), url) if p.step <= step]


def _parse_points(data: bytes, url: str) -> list[Point]:
    """The whole points of a metrics.jsonl.  It is written without fsync (it is rewritten at every
    report), so a crash can leave it cut short or holding blocks never written: such lines are
    skipped, with one warning, rather than stop the run from resuming."""
    points, unreadable = [], 0
    for line in data.decode(errors="replace").splitlines():
        try:
            point = Point.from_dict(json.loads(line))
        except ValueError:
            point = None
        if point is not None:
            points.append(point)
        elif line.strip():
            unreadable += 1
    if unreadable:
        say(f"charnn: warning: skipped {unreadable} unreadable line{'s' if unreadable > 1 else ''} of {url} "
            f"(cut short by a crash?); their points are lost")
    return points


def read_points(store: Store, run_url: str) -> dict[str, list[Point]]:
    """A run's logged points by split ("train", "val"), in step order."""
    url = join(run_url, METRICS_FILE)
    points = _parse_points(store.read(url), url)
    return {split: [p for p in points if p.split == split] for split in ("train", "val")}


def plot_losses(history: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for split, style in (("train", "-"), ("val", "o-")):
        if history.get(split):
            steps, losses = zip(*history[split])
            axes.plot(steps, losses, style, label=f"{split} loss", markersize=4)
    axes.set(xlabel="step", ylabel="cross-entropy (nats/char)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


class MetricsLogger:
    """The run's progress and validation lines and their records, at the spec's cadence: every
    rank takes part in the means, rank 0 prints and writes."""

    def __init__(self, run_log: RunLog | None, every: int, total: int | None, clock: TrainClock, workers: int = 1):
        self.run_log, self.every, self.total, self.clock, self.workers = run_log, every, total, clock, workers
        self.interval = Interval(clock)

    def should_log(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def log_train(self, step: int, epoch: int, optimizer_figures: dict, group: Collectives) -> TrainFigures:
        """Close the interval (a collective): its figures with the learning rate and gradient norm."""
        figures = TrainFigures(**self.interval.close(group), **optimizer_figures)
        if self.run_log is not None:
            eta = (self.total - step) * figures.seconds_per_step if self.total else 0.0
            say(f"charnn: step {step}/{self.total or '-'} epoch {epoch} loss {figures.loss:.4f} "
                f"acc {figures.accuracy:.3f} {figures.tokens_per_s:,.0f} tok/s lr {figures.lr:.2e} "
                f"grad {figures.grad_norm:.2f} train {self.clock.seconds():.0f}s eta {eta:.0f}s "
                f"workers {self.workers}")
            self.run_log.log(Point.of_train(step, figures, epoch, self.clock.seconds(), self.workers))
        return figures

    def log_val(self, step: int, figures: ValFigures, train_seconds: float) -> None:
        if self.run_log is None:
            return
        say(f"charnn: step {step} val_loss {figures.loss:.4f} val_acc {figures.accuracy:.3f} "
            f"val_bpc {figures.bpc:.3f} train {train_seconds:.0f}s")
        self.run_log.log(Point.of_val(step, figures, train_seconds))

    def flush(self) -> None:
        if self.run_log is not None:
            self.run_log.flush()

    def close(self) -> None:
        if self.run_log is not None:
            self.run_log.close()
