"""The per-worker training loop: read own rows, step, carry H, validate, checkpoint, report."""
from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs.spec import Spec, dump_spec, spec_from_dict
from pipeline.alphabet import alphabet_size
from pipeline.reader import SplitReader, load_manifest
from train import checkpoint as ckpt
from train.carry import epoch_of, next_epoch_states
from train.model import CharGRU, ModelShape
from train.optim import make_optimizer

log = logging.getLogger("charnn.train")


def say(message: str) -> None:
    """Rank 0's progress line, written past Ray Train's print patch (which would echo it twice)."""
    print(message, file=sys.__stdout__, flush=True)


def model_shape(spec: Spec, alphabet: str) -> ModelShape:
    return ModelShape(alphabet_size(alphabet), spec.model.cell_size, spec.model.layers, spec.model.embedding)


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized()):
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _batch(window: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.from_numpy(np.ascontiguousarray(window)).to(device, non_blocking=True).long()
    return codes[:, :-1], codes[:, 1:]


@torch.no_grad()
def evaluate(model: CharGRU, reader: SplitReader, device) -> dict:
    """Loss, accuracy and bits per character over every validation row of every worker."""
    was_training = model.training
    model.eval()
    h = model.zero_state(len(reader.rows), device)
    loss_sum = correct = count = 0.0
    for _, window in reader.windows():
        x, y = _batch(window, device)
        logits, h = model(x, h)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], device)
    loss = loss_sum / count
    return {"val_loss": loss, "val_accuracy": correct / count, "val_bpc": loss / math.log(2)}


@dataclass
class Progress:
    """Running train figures between two log lines (host syncs happen only at log time)."""

    loss: torch.Tensor | float = 0.0
    correct: torch.Tensor | float = 0.0
    count: int = 0
    steps: int = 0
    since: float = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss = self.loss + loss.detach()
        self.correct = self.correct + (logits.detach().argmax(-1) == y).sum()
        self.count += y.numel()
        self.steps += 1

    def take(self) -> tuple[float, float]:
        loss, accuracy = float(self.loss) / max(1, self.steps), float(self.correct) / max(1, self.count)
        self.loss, self.correct, self.count, self.steps, self.since = 0.0, 0.0, 0, 0, time.perf_counter()
        return loss, accuracy


def train_loop_per_worker(config: dict) -> None:
    spec = spec_from_dict(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    device = ray.train.torch.get_device()
    manifest = load_manifest(config["dataset"], spec.storage)
    train_rows = SplitReader(config["dataset"], manifest, "train", rank, world, spec.storage)
    val_rows = SplitReader(config["dataset"], manifest, "val", rank, world, spec.storage)
    steps_per_epoch = train_rows.steps
    total_steps = spec.train.steps or spec.train.epochs * steps_per_epoch

    torch.manual_seed(spec.train.seed)  # the same initial weights on every rank
    shape = model_shape(spec, manifest["alphabet"])
    model = CharGRU(shape, spec.model.dropout).to(device)
    optimizer, scheduler = make_optimizer(model, spec.train, total_steps, spec.cluster.use_gpu)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    step, states = 0, model.zero_state(len(train_rows.rows), device)
    torch.manual_seed(spec.train.seed * 1000 + rank + 1)  # per-rank dropout streams
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            step, states = _restore(directory, model, optimizer, scheduler, shape, manifest, train_rows, rank)
        states = states.to(device)
        if rank == 0:
            say(f"charnn: resumed {spec.run.name} at step {step}/{total_steps}")

    meta = {"alphabet": manifest["alphabet"], "spec": dump_spec(spec),
            "dataset": {"url": config["dataset"], "sources": manifest["sources"]}}
    progress, first_loss, started = Progress(since=time.perf_counter()), None, time.perf_counter()
    train_loss = train_accuracy = float("nan")
    tokens_per_step = spec.train.batch_per_worker * world * spec.data.seq_len
    windows = None
    if step >= total_steps and restored:  # a finished run, submitted again: report its final figures
        ray.train.report({**payload_metrics(restored), "resumed_finished": True})
    while step < total_steps:
        epoch, in_epoch = epoch_of(step, steps_per_epoch)
        if windows is None or in_epoch == 0:
            if in_epoch == 0 and step > 0:
                states = next_epoch_states(states, spec.train.epoch_state, rank, _gather)
            windows = train_rows.windows(in_epoch)
        got_step, window = next(windows)
        assert got_step == in_epoch, f"rank {rank} got window {got_step}, expected {in_epoch}"
        x, y = _batch(window, device)
        logits, h = ddp_model(x, states)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        states = h.detach()
        progress.add(loss, logits, y)
        step += 1
        if first_loss is None:
            first_loss = loss.item()

        last = step == total_steps
        if step % spec.train.log_every == 0 or last:
            elapsed = time.perf_counter() - progress.since
            steps_done = progress.steps
            train_loss, train_accuracy = progress.take()
            tokens_per_s = tokens_per_step * steps_done / max(elapsed, 1e-9)
            if rank == 0:
                eta = (total_steps - step) * elapsed / max(1, steps_done)
                say(f"charnn: step {step}/{total_steps} epoch {epoch} loss {train_loss:.4f} "
                    f"acc {train_accuracy:.3f} {tokens_per_s:,.0f} tok/s grad {float(grad_norm):.2f} eta {eta:.0f}s")
        validate = last or (spec.train.validate_every and step % spec.train.validate_every == 0)
        save = last or (spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0)
        if validate or save:
            metrics = {"step": step, "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                       "first_loss": first_loss, "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens_per_step * step / (time.perf_counter() - started)}
            if validate:
                metrics.update(evaluate(model, val_rows, device))
                if rank == 0:
                    say(f"charnn: step {step} val_loss {metrics['val_loss']:.4f} "
                        f"val_acc {metrics['val_accuracy']:.3f} val_bpc {metrics['val_bpc']:.3f}")
            _report(metrics, save, model, optimizer, scheduler, {**meta, "step": step, "epoch": epoch, "metrics": metrics},
                    rank, train_rows.rows, states)


def _report(metrics, save, model, optimizer, scheduler, meta, rank, rows, states) -> None:
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="charnn-ckpt-") as directory:
        ckpt.save_rank_files(directory, rank, rows, states)
        if rank == 0:
            ckpt.save_model_files(directory, model, optimizer, scheduler, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def payload_metrics(restored: ray.train.Checkpoint) -> dict:
    with restored.as_directory() as directory:
        return ckpt.load_model_file(directory).get("metrics", {})


def _restore(directory, model, optimizer, scheduler, shape, manifest, train_rows, rank):
    payload = ckpt.load_model_file(directory)
    ckpt.check_compatible(payload, shape, manifest["alphabet"])
    model.load_state_dict(payload["model"])
    saved = ckpt.load_optimizer_file(directory)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = ckpt.load_rng_file(directory, rank)
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return payload["step"], ckpt.load_row_states(directory, train_rows.rows)
