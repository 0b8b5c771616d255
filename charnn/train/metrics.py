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
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from charnn.storage import Store, basename, is_local, join
from charnn.train.state import OpenInterval
from charnn.train.step import all_sum, distributed

METRICS_FILE = "metrics.jsonl"


def say(message: str) -> None:
    """Rank 0's progress line, written past Ray Train's print patch (which would echo it twice)."""
    print(message, file=sys.__stdout__, flush=True)


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

    def carried(self, device) -> OpenInterval:
        """The interval so far, summed over every rank (a collective: every rank calls it, at
        checkpoint steps), for the checkpoint."""
        loss, correct, count = all_sum([float(self.loss), float(self.correct), self.count], device)
        return OpenInterval(loss, correct, int(count), self.steps, self.clock.seconds() - self.since)

    def resume(self, carried: OpenInterval | None, rank: int) -> None:
        """Continue the interval a checkpoint carried.  Rank 0 holds every rank's sums so far (the
        means of ``close`` sum over ranks, so each is counted once); every rank, its steps and time."""
        if carried is None:
            return
        if rank == 0:
            self.loss, self.correct, self.count = carried.loss, carried.correct, carried.count
        self.steps, self.since = carried.steps, self.clock.seconds() - carried.seconds

    def close(self, device) -> dict:
        """Mean loss and accuracy over all workers, and this interval's speed; starts a new interval."""
        seconds, steps = self.clock.seconds() - self.since, self.steps
        loss, correct, count = all_sum([float(self.loss) / steps, float(self.correct), self.count], device)
        world = dist.get_world_size() if distributed() else 1
        self.__init__(self.clock)
        return {"loss": loss / world, "accuracy": correct / count, "tokens_per_s": count / seconds,
                "seconds_per_step": seconds / steps}


class RunLog:
    """Rank 0's files: TensorBoard, ``metrics.jsonl`` and ``loss.png``."""

    def __init__(self, run_url: str, store: Store, start_step: int, history: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_url, self.store = run_url, store
        self.fs, path = store.fs(run_url)
        self.remote = None if is_local(self.fs) else path
        self.local = path if self.remote is None else tempfile.mkdtemp(prefix="charnn-run-")
        # purge_step drops events a crashed attempt wrote after the checkpoint we resume from (the
        # checkpoint step's own were logged before it was saved)
        self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.points = _points_until(store, join(run_url, METRICS_FILE), start_step)
        self.history = history or {"train": [], "val": []}

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{split}/{name}", value, step)
        self.points.append({"split": split, "step": step, **values, "time": time.time()})
        if "loss" in values:
            self.history[split].append([step, values["loss"]])

    def sample(self, step: int, text: str) -> None:
        self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # a code block keeps layout

    def flush(self) -> None:
        self.writer.flush()
        self.store.write(join(self.run_url, METRICS_FILE), "".join(json.dumps(p) + "\n" for p in self.points).encode(),
                         durable=False)
        if self.remote is not None:
            self.fs.put(os.path.join(self.local, "tensorboard") + "/", self.remote + "/tensorboard", recursive=True)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.store.write(join(self.run_url, "loss.png"), plot_losses(self.history, basename(self.run_url)))


def _points_until(store: Store, url: str, step: int) -> list[dict]:
    """The points an earlier attempt logged up to ``step`` (later ones it logged before it died
    are logged again)."""
    if not step or not store.exists(url):
        return []
    return [p for p in _parse_points(store.read(url), url) if p["step"] <= step]


def _parse_points(data: bytes, url: str) -> list[dict]:
    """The whole points of a metrics.jsonl.  It is written without fsync (it is rewritten at every
    report), so a crash can leave it cut short or holding blocks never written: such lines are
    skipped, with one warning, rather than stop the run from resuming."""
    points, unreadable = [], 0
    for line in data.decode(errors="replace").splitlines():
        try:
            point = json.loads(line)
        except ValueError:
            point = None
        if isinstance(point, dict) and isinstance(point.get("step"), int) and point.get("split") in ("train", "val"):
            points.append(point)
        elif line.strip():
            unreadable += 1
    if unreadable:
        say(f"charnn: warning: skipped {unreadable} unreadable line{'s' if unreadable > 1 else ''} of {url} "
            f"(cut short by a crash?); their points are lost")
    return points


def read_points(store: Store, run_url: str) -> dict[str, list[dict]]:
    """A run's logged points by split ("train", "val"), in step order."""
    url = join(run_url, METRICS_FILE)
    points = _parse_points(store.read(url), url)
    return {split: [p for p in points if p["split"] == split] for split in ("train", "val")}


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

    def log_train(self, step: int, epoch: int, optimizer_figures: dict, device) -> dict:
        """Close the interval (a collective): its figures with the learning rate and gradient norm."""
        figures = {**self.interval.close(device), **optimizer_figures}
        if self.run_log is not None:
            eta = (self.total - step) * figures["seconds_per_step"] if self.total else 0.0
            say(f"charnn: step {step}/{self.total or '-'} epoch {epoch} loss {figures['loss']:.4f} "
                f"acc {figures['accuracy']:.3f} {figures['tokens_per_s']:,.0f} tok/s lr {figures['lr']:.2e} "
                f"grad {figures['grad_norm']:.2f} train {self.clock.seconds():.0f}s eta {eta:.0f}s "
                f"workers {self.workers}")
            self.run_log.scalars("train", step, {
                "loss": figures["loss"], "accuracy": figures["accuracy"], "bpc": figures["loss"] / math.log(2),
                "lr": figures["lr"], "tokens_per_s": figures["tokens_per_s"], "grad_norm": figures["grad_norm"],
                "epoch": epoch, "train_seconds": self.clock.seconds(), "workers": self.workers})
        return figures

    def log_val(self, step: int, metrics: dict) -> None:
        if self.run_log is None:
            return
        say(f"charnn: step {step} val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.3f} "
            f"val_bpc {metrics['val_bpc']:.3f} train {metrics['train_seconds']:.0f}s")
        self.run_log.scalars("val", step, {"loss": metrics["val_loss"], "accuracy": metrics["val_accuracy"],
                                           "bpc": metrics["val_bpc"], "train_seconds": metrics["train_seconds"]})

    def flush(self) -> None:
        if self.run_log is not None:
            self.run_log.flush()

    def close(self) -> None:
        if self.run_log is not None:
            self.run_log.close()
