"""The per-worker training loop: read own rows, step, carry H, validate, checkpoint, report.

``train_loop_per_worker`` runs on every Ray Train worker; the step itself and validation
are in ``train/step.py``.  Hosts sync only at log, validation and checkpoint intervals;
``ray.train.report`` (which blocks for about 1.5 s) is called at validation and checkpoint
intervals only.
"""
from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from charnn.config import Spec, dump_spec, spec_from_dict
from charnn.data.alphabet import alphabet_size
from charnn.data.reader import SplitReader
from charnn.data.dataset import load_manifest
from charnn.storage import StorageError, Store, join
from charnn import checkpoint as ckpt
from charnn.train.carry import epoch_of, next_epoch_states
from charnn.train.faults import inject
from charnn.sample import GenerateOptions, sample_text
from charnn.train.metrics import RunLog
from charnn.model import CharGRU, ModelShape
from charnn.train.optim import make_optimizer
from charnn.train.step import all_sum, distributed, evaluate, to_batch, train_step


def say(message: str) -> None:
    """Rank 0's progress line, written past Ray Train's print patch (which would echo it twice)."""
    print(message, file=sys.__stdout__, flush=True)


def model_shape(spec: Spec, alphabet: str) -> ModelShape:
    return ModelShape(alphabet_size(alphabet), spec.model.cell_size, spec.model.layers, spec.model.embedding)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    if not distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


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

    def close(self, device) -> dict:
        """Mean loss and accuracy over all workers, and this interval's speed; starts a new interval."""
        seconds, steps = self.clock.seconds() - self.since, self.steps
        loss, correct, count = all_sum([float(self.loss) / steps, float(self.correct), self.count], device)
        world = dist.get_world_size() if distributed() else 1
        self.__init__(self.clock)
        return {"loss": loss / world, "accuracy": correct / count, "tokens_per_s": count / seconds,
                "seconds_per_step": seconds / steps}


def train_loop_per_worker(config: dict) -> None:
    spec = spec_from_dict(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    device = ray.train.torch.get_device()
    store = Store.of(spec.storage)
    manifest = load_manifest(config["dataset"], store)
    train_rows = SplitReader(config["dataset"], manifest, "train", rank, world, store)
    val_rows = SplitReader(config["dataset"], manifest, "val", rank, world, store)
    total_steps = spec.train.steps or spec.train.epochs * train_rows.steps

    torch.manual_seed(spec.train.seed)  # the same initial weights on every rank
    shape = model_shape(spec, manifest.alphabet)
    model = CharGRU(shape, spec.model.dropout).to(device)
    if config.get("init_from"):  # warm start (retraining): the weights only, a fresh optimiser
        init = ckpt.load_payload(config["init_from"], store)
        ckpt.check_compatible(init, shape, manifest.alphabet)
        model.load_state_dict(init["model"])
    optimizer, scheduler = make_optimizer(model, spec.train, total_steps, spec.cluster.use_gpu)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    torch.manual_seed(spec.train.seed * 1000 + rank + 1)  # per-rank dropout streams

    step, states, saved = 0, model.zero_state(len(train_rows.rows), device), {}
    run_url = join(spec.run.storage, spec.run.name)
    resume_url, attempt = _agree_on_resume(run_url, store, rank, ray.train.get_checkpoint())
    with store.local_dir(resume_url) if resume_url else contextlib.nullcontext() as directory:
        restored = directory is not None
        if restored:
            step, states, saved = _restore(directory, model, optimizer, scheduler, shape, manifest, train_rows, rank)
            states = states.to(device)
            if rank == 0:
                say(f"charnn: resumed {spec.run.name} at step {step}/{total_steps}")
    if step >= total_steps and restored:  # a finished run submitted again: report its final figures
        ray.train.report(saved.get("metrics", {}))
        return

    run_log = RunLog(run_url, store, step, saved.get("history")) if rank == 0 else None
    meta = {"alphabet": manifest.alphabet, "spec": dump_spec(spec), "stream": manifest.stream,
            "settings": ckpt.resume_settings(spec), "attempt": attempt,
            "dataset": {"url": config["dataset"], "documents": manifest.documents}}
    clock = TrainClock(saved.get("metrics", {}).get("train_seconds", 0.0))
    interval, windows, last_train, started, first_step = Interval(clock), None, {}, time.perf_counter(), step
    first_loss = saved.get("metrics", {}).get("first_loss")
    while step < total_steps:
        epoch, in_epoch = epoch_of(step, train_rows.steps)
        if windows is None or in_epoch == 0:
            if in_epoch == 0 and step > 0:
                states = next_epoch_states(states, spec.train.epoch_state, rank, _gather)
            windows = train_rows.windows(in_epoch)
        got_step, window = next(windows)
        assert got_step == in_epoch, f"rank {rank} got window {got_step}, expected {in_epoch}"
        x, y = to_batch(window, device)
        loss, logits, states, grad_norm = train_step(ddp_model, optimizer, scheduler, x, y, states,
                                                     spec.train.grad_clip, device)
        interval.add(loss, logits, y)
        step += 1
        inject("kill", step, rank)
        inject("raise", step, rank)
        first_loss = first_loss if first_loss is not None else all_sum([loss.item()], device)[0] / world

        last = step == total_steps
        if step % spec.train.log_every == 0 or last:
            last_train = {**interval.close(device), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            if rank == 0:
                _log_progress(run_log, step, total_steps, epoch, last_train, clock.seconds())
        if rank == 0 and spec.train.sample_every and step % spec.train.sample_every == 0:
            with clock.paused():
                run_log.sample(step, "".join(sample_text(model, manifest.alphabet, GenerateOptions(length=spec.train.sample_length, top_k=5))))
        validate = last or (spec.train.validate_every and step % spec.train.validate_every == 0)
        save = last or (spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0)
        if validate or save:
            with clock.paused():
                metrics = {"step": step, "epoch": epoch, "first_loss": first_loss, "train_seconds": clock.before,
                           **{f"train_{k}": v for k, v in last_train.items()},
                           "tokens_per_s": (step - first_step) * x.numel() * world / (time.perf_counter() - started)}
                if validate:
                    metrics.update(evaluate(model, val_rows, device))
                    if rank == 0:
                        _log_validation(run_log, step, metrics)
                if rank == 0:
                    run_log.flush()
                history = run_log.history if rank == 0 else None
                _report(metrics, save, model, optimizer, scheduler,
                        {**meta, "step": step, "epoch": epoch, "metrics": metrics, "history": history},
                        rank, world, train_rows.rows, states)
        inject("pause", step, rank)
    if rank == 0:
        run_log.close()


def _log_progress(run_log: RunLog, step: int, total: int, epoch: int, figures: dict, train_seconds: float) -> None:
    eta = (total - step) * figures["seconds_per_step"]
    say(f"charnn: step {step}/{total} epoch {epoch} loss {figures['loss']:.4f} acc {figures['accuracy']:.3f} "
        f"{figures['tokens_per_s']:,.0f} tok/s lr {figures['lr']:.2e} grad {figures['grad_norm']:.2f} "
        f"train {train_seconds:.0f}s eta {eta:.0f}s")
    run_log.scalars("train", step, {"loss": figures["loss"], "accuracy": figures["accuracy"],
                                    "bpc": figures["loss"] / math.log(2), "lr": figures["lr"],
                                    "tokens_per_s": figures["tokens_per_s"], "grad_norm": figures["grad_norm"]})


def _log_validation(run_log: RunLog, step: int, metrics: dict) -> None:
    say(f"charnn: step {step} val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.3f} "
        f"val_bpc {metrics['val_bpc']:.3f} train {metrics['train_seconds']:.0f}s")
    run_log.scalars("val", step, {"loss": metrics["val_loss"], "accuracy": metrics["val_accuracy"],
                                  "bpc": metrics["val_bpc"]})


def _report(metrics, save, model, optimizer, scheduler, meta, rank, world, rows, states) -> None:
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="charnn-ckpt-") as directory:
        ckpt.save_rank_files(directory, rank, rows, states)
        if rank == 0:
            ckpt.save_model_files(directory, model, optimizer, scheduler, meta)
        ckpt.save_checksums(directory, rank, world)
        inject("kill-in-checkpoint", meta["step"], rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=ckpt.checkpoint_name(meta["step"], meta["attempt"]))


def _agree_on_resume(run_url: str, store: Store, rank: int, registered: ray.train.Checkpoint | None) -> tuple:
    """(URL of the checkpoint to resume from or None, this attempt's id), decided by rank 0 for
    every rank: ranks that each chose for themselves could resume different weights, or hang in a
    collective, after a read error on one of them.

    Rank 0 takes the run directory's newest good checkpoint.  It may be newer than the one Ray
    Train hands back, when a worker died between saving a checkpoint and the controller
    registering it; or older, when the registered one was damaged afterwards."""
    choice = [None, uuid.uuid4().hex[:8], None]
    if rank == 0:
        try:
            choice[0] = ckpt.latest_checkpoint(run_url, store)
            _say_if_not_registered(registered, choice[0], run_url)
        except (ckpt.CheckpointError, StorageError) as exc:
            choice[2] = exc
    if distributed():
        dist.broadcast_object_list(choice, src=0)
    if choice[2] is not None:
        raise choice[2]
    return choice[0], choice[1]


def _say_if_not_registered(registered: ray.train.Checkpoint | None, url: str | None, run_url: str) -> None:
    theirs = registered and registered.path.rstrip("/").rsplit("/", 1)[-1]
    name = url and url.rsplit("/", 1)[-1]
    if theirs and url is None:
        raise ckpt.CheckpointError(f"checkpoint {theirs} of {run_url} is damaged and no earlier one is good; "
                                   f"delete {run_url} to start over")
    if theirs and name != theirs:
        newer = ckpt.checkpoint_step_order(name) > ckpt.checkpoint_step_order(theirs)
        why = "is older than one saved but not yet registered" if newer else "is damaged"
        say(f"charnn: warning: checkpoint {theirs} {why}; resuming from {name}")


def _restore(directory, model, optimizer, scheduler, shape, manifest, train_rows, rank):
    payload = ckpt.load_model_file(directory)
    ckpt.check_compatible(payload, shape, manifest.alphabet)
    model.load_state_dict(payload["model"])
    saved = ckpt.load_optimizer_file(directory)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = ckpt.load_rng_file(directory, rank)
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return payload["step"], ckpt.load_row_states(directory, train_rows.rows), payload
