"""Adam with optional warmup and cosine or step decay (all from the spec's train section)."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of ``train.lr`` at a 0-based step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":  # x0.1 at 2/3 and again at 8/9 of the steps after warmup
        return 1.0 if progress < 2 / 3 else 0.1 if progress < 8 / 9 else 0.01
    return 1.0


def make_optimizer(model: torch.nn.Module, train, total_steps: int, use_gpu: bool):
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, fused=use_gpu or None, foreach=None if use_gpu else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, train.warmup_steps, train.schedule, train.min_lr_ratio),
    )
    return optimizer, scheduler
