"""Adam with optional warmup and cosine or step decay (all from the spec's train section)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from charnn.train.collectives import Collectives


def decay(progress: float, schedule: str, min_ratio: float) -> float:
    """Multiplier of ``train.lr`` once warmup is over, ``progress`` (0 to 1) of the way through."""
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":  # x0.1 at 2/3 and again at 8/9 of the way
        return 1.0 if progress < 2 / 3 else 0.1 if progress < 8 / 9 else 0.01
    return 1.0


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of ``train.lr`` at a 0-based step of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return decay((step - warmup) / max(1, total - warmup), schedule, min_ratio)


@dataclass
class TimeBudget:
    """``train.minutes`` of training clock: it paces the schedule and ends the run.  Every rank
    reads one clock, the latest of the ranks' clocks that they agreed on at a log step: a rank that
    read its own would apply its own learning rate, and DDP would keep replicas that differ."""

    seconds: float
    agreed: float = 0.0  # the training clock as agreed last (after a resume: the checkpoint's)

    def progress(self) -> float:
        """How much of the budget is spent, 0 to 1, by the agreed clock."""
        return min(1.0, self.agreed / self.seconds)

    def spent(self) -> bool:
        return self.agreed >= self.seconds

    def agree(self, clock_seconds: float, group: Collectives) -> bool:
        """Agree on the clock with every rank (a collective, for log steps): the latest of theirs
        becomes everyone's.  Whether the budget is spent."""
        self.agreed = group.all_max([clock_seconds])[0]
        return self.spent()


def pace(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the learning rate again for the schedule's current step, now that what paces it (the
    agreed clock) has moved: the steps until the next agreement take the new rate, not one step
    later."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        rate = base * factor(scheduler.last_epoch)
        if isinstance(group["lr"], torch.Tensor):  # fused or capturable Adam may hold it as a tensor
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def make_optimizer(model: torch.nn.Module, train, total_steps: int, use_gpu: bool, progress=None):
    """Adam and its schedule.  The schedule follows the steps, or ``progress()`` (0 to 1: how
    much of a time budget is spent, the same on every rank) once warmup is over."""
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, fused=use_gpu or None, foreach=None if use_gpu else True)

    def factor(step: int) -> float:
        if progress is None or (train.warmup_steps and step < train.warmup_steps):
            return lr_factor(step, total_steps, train.warmup_steps, train.schedule, train.min_lr_ratio)
        return decay(progress(), train.schedule, train.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
