"""The training step and validation, in plain PyTorch: no Ray here, so the bare benchmarks,
the profiler and a GPU check run the very code that the Ray Train workers run; and the guard that
stops a run whose loss or weights are no longer finite."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from charnn.data.reader import SplitReader
from charnn.errors import UserError
from charnn.model import CharGRU
from charnn.train.collectives import Collectives
from charnn.train.figures import ValFigures


class TrainingDiverged(UserError):
    """A run whose loss or weights are no longer finite numbers: it stops before it saves or
    reports them (a checkpoint of NaN weights would be resumed, published and sampled from)."""


def diverged(what: str, step: int) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what} at step {step} (not saved); use a new run.name with a "
                            f"lower train.lr or a train.grad_clip")


def check_figures(figures: dict[str, float | None], step: int) -> None:
    """Raise TrainingDiverged if one of ``figures`` (each named as the message says it) is not
    finite.  They must be all-reduced, the same on every rank, so that every rank raises here."""
    for what, value in figures.items():
        if value is not None and not math.isfinite(value):
            raise diverged(f"{what} is {value}", step)


def check_weights_and_loss(model: torch.nn.Module, running_loss: torch.Tensor | float, step: int,
                           group: Collectives) -> None:
    """Raise TrainingDiverged, on every rank of ``group`` at this step, if any rank's weights or the
    train loss it has summed since its last progress line are not finite.  One all-reduce and one
    host sync: for steps that sync anyway (log, sample, validation and checkpoint steps)."""
    weights = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    loss = torch.isfinite(torch.as_tensor(running_loss, device=group.device)).all()
    weights_bad, loss_bad = group.all_sum(torch.stack([~weights, ~loss]))  # on the device: one host sync
    if weights_bad:
        raise diverged("the weights are not finite (NaN or inf)", step)
    if loss_bad:
        raise diverged("the train loss is not finite", step)


def to_batch(window: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, T] of a window [B, T+1]; pinned and copied asynchronously on GPU."""
    codes = torch.from_numpy(np.ascontiguousarray(window))
    if device.type == "cuda":
        codes = codes.pin_memory()
    codes = codes.to(device, non_blocking=True).long()
    return codes[:, :-1], codes[:, 1:]


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


STEP_REGIONS = ("forward", "backward", "clip", "optimizer")  # labelled for the profiler (bench/step_profile.py)


@dataclass
class Parts:
    """What a training step updates: the model (as the step calls it: DDP across workers), its
    optimiser and learning-rate schedule; how it clips; where it runs; how its rank's loss is
    weighted (``charnn.data.layout.loss_weight``: 1 unless the rows split unevenly over the ranks)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float = 0.0  # 0: no clipping
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    loss_weight: float = 1.0


def train_step(parts: Parts, x: torch.Tensor, y: torch.Tensor, states: torch.Tensor):
    """One optimiser step from the carried ``states``; returns (loss, logits, next states, grad norm):
    the loss is this rank's, weighted (so that the ranks' mean is the mean over every row's tokens)."""
    with record_function("forward"), autocast(parts.device):
        logits, h = parts.model(x, states)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if parts.loss_weight != 1.0:
            loss = loss * parts.loss_weight
    parts.optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("clip"):
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip or float("inf"))
    with record_function("optimizer"):
        parts.optimizer.step()
        parts.scheduler.step()
    return loss.detach(), logits.detach(), h.detach().float(), grad_norm


@torch.no_grad()
def evaluate(model: CharGRU, reader: SplitReader, group: Collectives) -> ValFigures:
    """Loss and accuracy (hence bits per character) over every validation row of every rank of ``group``."""
    device = group.device
    was_training = model.training
    model.eval()
    h = model.zero_state(len(reader.rows), device)
    loss_sum = correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for _, window in reader.windows():
        x, y = to_batch(window, device)
        with autocast(device):
            logits, h = model(x, h)
        loss_sum = loss_sum + F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        correct = correct + (logits.argmax(-1) == y).sum()
        count += y.numel()
    model.train(was_training)
    loss_sum, correct, count = group.all_sum([float(loss_sum), float(correct), count])
    return ValFigures(loss_sum / count, correct / count)
