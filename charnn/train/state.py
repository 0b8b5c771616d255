"""Where a run is: what a checkpoint carries besides the weights, the optimiser and the hidden
states.  It maps onto the keys that checkpoints have always held (``step``, ``epoch``,
``metrics``, ``history``), so runs resume across versions."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


def _no_history() -> dict:
    return {"train": [], "val": []}


@dataclass(frozen=True)
class OpenInterval:
    """The train figures summed since the last progress line, over every rank, when a checkpoint was
    saved: a run resumed from it continues the interval, so that its next progress line (and its
    result's train_loss) is the uninterrupted run's."""

    loss: float  # the ranks' per-step mean losses, summed over steps and ranks
    correct: float
    count: int  # tokens, over every rank
    steps: int
    seconds: float  # of training clock


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    train_seconds: float = 0.0  # in training steps, across resumes (validation and checkpoints left out)
    first_loss: float | None = None  # the global loss of the run's first step
    # {"train"|"val": [[step, loss], ...]} for the plot, and "workers": [[first step, workers], ...]
    history: dict = field(default_factory=_no_history)
    metrics: dict = field(default_factory=dict)  # the figures of the newest report
    interval: OpenInterval | None = None  # the progress figures open at the newest checkpoint

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainState":
        metrics = payload.get("metrics") or {}
        interval = payload.get("interval")  # absent from checkpoints saved before it was carried
        return cls(payload["step"], payload.get("epoch", 0), metrics.get("train_seconds", 0.0),
                   metrics.get("first_loss"), payload.get("history") or _no_history(), metrics,
                   OpenInterval(**interval) if interval else None)

    def payload(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "metrics": self.metrics, "history": self.history,
                "interval": asdict(self.interval) if self.interval else None}
