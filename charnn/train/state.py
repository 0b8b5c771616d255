"""Where a run is: what a checkpoint carries besides the weights, the optimiser and the hidden
states.  It maps onto the keys that checkpoints have always held (``step``, ``epoch``,
``metrics``, ``history``, ``interval``), so runs resume across versions."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from charnn.train.figures import RunFigures, TrainFigures, ValFigures


def total_steps(train, steps_per_epoch: int | None) -> int | None:
    """A run's length in steps (``train`` is the spec's section): train.steps, else train.epochs of the
    train split's ``steps_per_epoch``; None under a time budget (train.minutes) or while the split's
    steps are not known."""
    if train.minutes:
        return None
    if train.steps:
        return train.steps
    return None if steps_per_epoch is None else train.epochs * steps_per_epoch


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
    """The run's position and clock, and the figures of its newest report (which the checkpoint's
    ``metrics`` hold, with the position and clock, as one flat dict)."""

    step: int = 0
    epoch: int = 0
    train_seconds: float = 0.0  # in training steps, across resumes (validation and checkpoints left out)
    first_loss: float | None = None  # the global loss of the run's first step
    # {"train"|"val": [[step, loss], ...]} for the plot, and "workers": [[first step, workers], ...]
    history: dict = field(default_factory=_no_history)
    interval: OpenInterval | None = None  # the progress figures open at the newest checkpoint
    train: TrainFigures | None = None  # the newest report's progress figures
    tokens_per_s: float | None = None  # the newest report's speed over its attempt
    val: ValFigures | None = None  # the newest report's validation, if it had one

    @property
    def figures(self) -> RunFigures:
        return RunFigures(self.step, self.epoch, self.first_loss, self.train_seconds, self.train, self.tokens_per_s,
                          self.val)

    def reported(self, figures: RunFigures) -> None:
        """Take the figures of a report as the newest (its position and clock are the state's)."""
        self.train, self.tokens_per_s, self.val = figures.train, figures.tokens_per_s, figures.val

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainState":
        figures = RunFigures.from_metrics(payload.get("metrics") or {}, payload["step"], payload.get("epoch", 0))
        interval = payload.get("interval")  # absent from checkpoints saved before it was carried
        state = cls(payload["step"], payload.get("epoch", 0), figures.train_seconds, figures.first_loss,
                    payload.get("history") or _no_history(), OpenInterval(**interval) if interval else None)
        state.reported(figures)
        return state

    def payload(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "metrics": self.figures.to_metrics(), "history": self.history,
                "interval": asdict(self.interval) if self.interval else None}
