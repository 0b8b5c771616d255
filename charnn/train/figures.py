"""A run's figures, one record each for what a progress line, a validation and a report say.

The same records feed the progress and validation lines, ``metrics.jsonl``, ``ray.train.report``,
the ``metrics`` of ``model.pt`` and the job's result line, so a figure is computed once and named
once.  The flat dicts they turn into keep the keys those files and lines have always had
(``train_loss``, ``val_bpc``, ...): bench/quality.py and older checkpoints read them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields


def bits_per_char(loss: float) -> float:
    """A cross-entropy in nats per character, in bits per character."""
    return loss / math.log(2)


def tokens_per_s(tokens: float, seconds: float) -> float:
    """Tokens (of every worker) per second of the training clock, which leaves validation, samples and
    checkpoints out: a progress line's speed and the run's are the same measure over other spans."""
    return tokens / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class TrainFigures:
    """A progress line's figures: means over every worker since the previous line.  A checkpoint
    whose attempt saved before its first line may know the loss alone (``Trainer._finish``)."""

    loss: float
    accuracy: float | None = None
    tokens_per_s: float | None = None
    seconds_per_step: float | None = None
    lr: float | None = None
    grad_norm: float | None = None

    @property
    def bpc(self) -> float:
        return bits_per_char(self.loss)

    def items(self) -> dict:
        """The figures it has, by name (``train_<name>`` in a report)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_items(cls, values: dict) -> "TrainFigures | None":
        known = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        return cls(**known) if known.get("loss") is not None else None


@dataclass(frozen=True)
class ValFigures:
    """Validation over every validation row of every worker."""

    loss: float
    accuracy: float

    @property
    def bpc(self) -> float:
        return bits_per_char(self.loss)

    def items(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "bpc": self.bpc}

    def metrics(self) -> dict:
        """As a report and a published version's ``metrics`` name them: ``val_loss``, ..."""
        return {f"val_{k}": v for k, v in self.items().items()}

    @classmethod
    def from_items(cls, values: dict) -> "ValFigures | None":
        return cls(values["loss"], values["accuracy"]) if values.get("loss") is not None else None


@dataclass(frozen=True)
class RunFigures:
    """The figures of one report: where the run is, its newest progress line, its speed over this
    attempt and, at a validation step, the validation.  ``to_metrics`` is the flat dict that
    ``ray.train.report`` takes and ``model.pt`` keeps under ``metrics``."""

    step: int
    epoch: int
    first_loss: float | None = None  # the global loss of the run's first step
    train_seconds: float = 0.0  # of training clock, across resumes
    train: TrainFigures | None = None  # None: no progress line yet in this attempt
    tokens_per_s: float | None = None  # over this attempt's training clock
    val: ValFigures | None = None  # None: not a validation step

    def to_metrics(self) -> dict:
        metrics = {"step": self.step, "epoch": self.epoch, "first_loss": self.first_loss,
                   "train_seconds": self.train_seconds}
        metrics |= {f"train_{k}": v for k, v in (self.train.items() if self.train else {}).items()}
        if self.tokens_per_s is not None:
            metrics["tokens_per_s"] = self.tokens_per_s
        return metrics | (self.val.metrics() if self.val else {})

    @classmethod
    def from_metrics(cls, metrics: dict, step: int = 0, epoch: int = 0) -> "RunFigures":
        """The record of a report's flat dict (a checkpoint's ``metrics``, Ray's ``Result.metrics``);
        ``step`` and ``epoch`` stand in where a checkpoint saved before they were recorded lacks them."""
        prefixed = {split: {k[len(split) + 1:]: v for k, v in metrics.items() if k.startswith(f"{split}_")}
                    for split in ("train", "val")}
        return cls(metrics.get("step", step), metrics.get("epoch", epoch), metrics.get("first_loss"),
                   prefixed["train"].pop("seconds", metrics.get("train_seconds", 0.0)),
                   TrainFigures.from_items(prefixed["train"]), metrics.get("tokens_per_s"),
                   ValFigures.from_items(prefixed["val"]))
