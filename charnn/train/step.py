"""The training step and validation, in plain PyTorch: no Ray here, so the bare benchmarks,
the profiler and a GPU check run the very code that the Ray Train workers run."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from charnn.storage import Store
from charnn.data.reader import SplitReader
from charnn.data.dataset import load_manifest
from charnn import checkpoint as ckpt
from charnn.model import CharGRU


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


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


def train_step(model, optimizer, scheduler, x, y, states, grad_clip: float, device):
    """One optimiser step from the carried ``states``; returns (loss, logits, next states, grad norm)."""
    with record_function("forward"), autocast(device):
        logits, h = model(x, states)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("clip"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    with record_function("optimizer"):
        optimizer.step()
        scheduler.step()
    return loss.detach(), logits.detach(), h.detach().float(), grad_norm


@torch.no_grad()
def evaluate(model: CharGRU, reader: SplitReader, device) -> dict:
    """Loss, accuracy and bits per character over every validation row of every worker."""
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
    loss_sum, correct, count = all_sum([float(loss_sum), float(correct), count], device)
    loss = loss_sum / count
    return {"val_loss": loss, "val_accuracy": correct / count, "val_bpc": loss / math.log(2)}


def evaluate_checkpoints(urls: list[str], dataset_url: str, store: Store = Store()) -> list[dict]:
    """Validation figures of each checkpoint over every validation row, in this one process.

    Every rank's rows hold the same number of tokens, so the mean of the ranks' means is the
    figure ``evaluate`` gives under Ray Train."""
    manifest = load_manifest(dataset_url, store)
    world = manifest.workers
    readers = [SplitReader(dataset_url, manifest, "val", rank, world, store) for rank in range(world)]
    figures = []
    for url in urls:
        model, payload = ckpt.load_model(url, store)
        if payload["alphabet"] != manifest.alphabet:
            raise ckpt.CheckpointError(f"{url} is a {payload['alphabet']} model; the dataset is {manifest.alphabet}")
        per_rank = [evaluate(model, reader, torch.device("cpu")) for reader in readers]
        figures.append({key: sum(f[key] for f in per_rank) / world for key in per_rank[0]})
    return figures
