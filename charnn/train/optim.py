"""Adam with optional warmup and cosine or step decay (all from the spec's train section)."""
from __future__ import annotations

import math

import torch


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


def make_optimizer(model: torch.nn.Module, train, total_steps: int, use_gpu: bool, progress=None):
    """Adam and its schedule.  The schedule follows the steps, or ``progress()`` (0 to 1: how
    much of a time budget is spent) once warmup is over."""
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, fused=use_gpu or None, foreach=None if use_gpu else True)

    def factor(step: int) -> float:
        if progress is None or (train.warmup_steps and step < train.warmup_steps):
            return lr_factor(step, total_steps, train.warmup_steps, train.schedule, train.min_lr_ratio)
        return decay(progress(), train.schedule, train.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
