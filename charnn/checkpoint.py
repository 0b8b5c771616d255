"""Checkpoint files: plain tensors and dicts, loadable with ``torch.load(weights_only=True)``.

A checkpoint directory holds ``model.pt`` (weights, shape, alphabet, spec, dataset, step)
and ``optimizer.pt`` from rank 0, plus from every rank the hidden states of the rows it owns
(``carry-rows-<first>-<stop>.pt``), its RNG state (``rng-rank<r>.pt``) and, written last, the
SHA-256 of each of its files (``checksums-rank<r>.json``).  Ray Train merges the ranks' files
into one directory.  Hidden states are stored per row, so a run can resume on another number
of workers.  A checkpoint whose checksums are missing or do not match (damaged, or written by
a save that was interrupted) is skipped in favour of the previous good one.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from typing import Any

import torch

from charnn.errors import UserError
from charnn.storage import StorageError, Store, describe_error
from charnn.model import CharGRU, ModelShape

FORMAT = "charnn.checkpoint/1"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
CHECKSUMS = "checksums-rank{rank:04d}.json"
READ_ATTEMPTS = 3  # a checkpoint store that cannot be read is asked again this often, then it is an error
HASH_CHUNK = 4 * 1024 * 1024  # bytes a checksum reads at a time: memory stays bounded whatever a file's size

log = logging.getLogger("charnn.checkpoint")


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the spec."""


def save_rank_files(directory: str, rank: int, rows: range, states: torch.Tensor) -> None:
    torch.save(states.detach().cpu(), os.path.join(directory, f"carry-rows-{rows.start:06d}-{rows.stop:06d}.pt"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(directory, f"rng-rank{rank:04d}.pt"))


def save_model_files(directory: str, model: CharGRU, optimizer, scheduler, meta: dict[str, Any]) -> None:
    torch.save({"format": FORMAT, "model": model.state_dict(), "shape": model.shape.to_dict(), **meta},
               os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, OPTIMIZER_FILE))


def save_checksums(directory: str, rank: int, world: int) -> None:
    """Seal this rank's files: called after it has written all of them."""
    files = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = hashlib.file_digest(f, "sha256").hexdigest()
    with open(os.path.join(directory, CHECKSUMS.format(rank=rank)), "w") as f:
        json.dump({"world": world, "files": files}, f)


def checkpoint_name(step: int, attempt: str) -> str:
    """A checkpoint's directory name: its step first, so that names sort as steps do, and the
    attempt that wrote it, so that an attempt never writes into an earlier one's checkpoint."""
    return f"checkpoint_{step:09d}_{attempt}"


# checkpoint_<step>_<generation>_<random hex>, or checkpoint_<step>_<random hex> before generations
STEP_NAME = re.compile(r"checkpoint_(\d{9})_(?:(\d+)_)?\w+")


def new_attempt(resumed: str | None) -> str:
    """The id of an attempt that resumes the checkpoint named ``resumed`` (None: a fresh run):
    one generation more than that checkpoint's, then random hex.  So its checkpoints sort after
    the one it resumed even at the same step, as when a run that stopped at a checkpoint is
    finished there (``checkpoint_step_order``)."""
    match = resumed and STEP_NAME.fullmatch(resumed)
    generation = int(match.group(2) or 0) if match else 0
    return f"{generation + 1:04d}_{uuid.uuid4().hex[:8]}"


def checkpoint_step_order(name: str) -> tuple:
    """Sort key: step-named checkpoints by step, then by generation (those named before
    generations first); Ray's time-named ones (before step names) before all."""
    match = STEP_NAME.fullmatch(name)
    return (1, int(match.group(1)), int(match.group(2) or 0), name) if match else (0, 0, 0, name)


def checkpoint_problem(url: str, store: Store = Store()) -> str | None:
    """Why the checkpoint at ``url`` (a directory or storage URL) is damaged, or None if it is
    whole.  A store that cannot be read raises: that is not damage, and the caller retries."""
    fs, path = store.fs(url)
    fs.invalidate_cache()
    present = {_basename(p) for p in fs.ls(path, detail=False)}
    sums = sorted(n for n in present if n.startswith("checksums-rank"))
    if not sums:
        return "it has no checksums-rank*.json (its save did not finish)"
    try:
        world = json.loads(fs.cat_file(f"{path}/{sums[0]}"))["world"]
        for rank in range(world):
            name = CHECKSUMS.format(rank=rank)
            if name not in present:
                return f"{name} is missing (rank {rank}'s save did not finish)"
            for file, digest in json.loads(fs.cat_file(f"{path}/{name}"))["files"].items():
                if file not in present:
                    return f"{file} is missing"
                if file_sha256(fs, f"{path}/{file}") != digest:
                    return f"{file} does not match its checksum (damaged or partly written)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"its checksums cannot be read ({type(exc).__name__})"
    except FileNotFoundError as exc:
        return f"{_basename(str(exc.filename or exc))} vanished while it was checked"
    return None


def file_sha256(fs, path: str) -> str:
    """The SHA-256 of a file on ``fs``, read in HASH_CHUNK blocks (optimizer.pt alone is twice the
    weights: read whole, a large model's would cost gigabytes on the driver and on rank 0)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=HASH_CHUNK) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _retried(what: str, url: str, action, attempts: int = READ_ATTEMPTS):
    """``action()``, tried again after a read error (with a pause); then one StorageError line."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read now may be readable soon
            if attempt == attempts:
                raise StorageError(f"cannot {what} {describe_error(url, exc)}; run the job again once the "
                                   f"storage answers") from None
            log.warning("reading %s failed (%s); trying again", url, type(exc).__name__)
            time.sleep(2 ** attempt)


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or pickled-object files
        raise CheckpointError(f"{path} is not a readable charnn checkpoint file ({type(exc).__name__}); "
                              f"use another checkpoint") from None


def load_model_file(directory: str) -> dict:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {MODEL_FILE}: not a charnn checkpoint")
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    return payload


def saved_shape(payload: dict, where: str) -> ModelShape:
    """The model shape a checkpoint declares, checked against its weights before anything of
    that size is allocated."""
    try:
        shape = ModelShape(**payload["shape"])
        expected = CharGRU.parameter_shapes(shape)
        found = {name: tuple(tensor.shape) for name, tensor in payload["model"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where} is not a readable charnn checkpoint ({type(exc).__name__}: {exc}); "
                              f"use another checkpoint") from None
    if found != expected:
        raise CheckpointError(f"{where}: its weights do not match the shape it declares ({shape}); "
                              f"use another checkpoint")
    return shape


def check_compatible(payload: dict, shape: ModelShape, alphabet: str) -> None:
    theirs = saved_shape(payload, "the checkpoint")
    if theirs != shape or payload["alphabet"] != alphabet:
        raise CheckpointError(
            f"checkpoint is a {payload['alphabet']} model {theirs}, the spec asks for {alphabet} {shape}; "
            f"use a new run.name or the checkpoint's model settings"
        )


def load_optimizer_file(directory: str) -> dict:
    return _load(os.path.join(directory, OPTIMIZER_FILE))


def load_row_states(directory: str, rows: range) -> torch.Tensor:
    """States [layers, len(rows), H] of ``rows``, gathered from whichever ranks saved them."""
    pieces = {}
    for path in glob.glob(os.path.join(directory, "carry-rows-*.pt")):
        match = re.fullmatch(r"carry-rows-(\d+)-(\d+)\.pt", os.path.basename(path))
        if not match:
            raise CheckpointError(f"{path} is not a carry file of a charnn checkpoint; use another checkpoint")
        first, stop = int(match.group(1)), int(match.group(2))
        if first < rows.stop and stop > rows.start:
            states = _load(path)
            lo, hi = max(first, rows.start), min(stop, rows.stop)
            pieces[lo] = states[:, lo - first : hi - first]
    states = torch.cat([pieces[k] for k in sorted(pieces)], dim=1) if pieces else None
    if states is None or states.shape[1] != len(rows):
        raise CheckpointError(f"{directory} lacks hidden states for rows {rows.start}..{rows.stop - 1}")
    return states


def load_rng_file(directory: str, rank: int) -> dict | None:
    path = os.path.join(directory, f"rng-rank{rank:04d}.pt")
    return _load(path) if os.path.exists(path) else None


def checkpoint_names(run_url: str, store: Store = Store()) -> list[str]:
    """The names of a run's checkpoint directories, oldest first (nothing read but the listing)."""
    def names():
        fs, path = store.fs(run_url)
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        return [_basename(e["name"]) for e in fs.ls(path, detail=True) if e["type"] == "directory"]
    found = _retried("list the checkpoints of", run_url, names)
    return sorted((n for n in found if n.startswith("checkpoint_")), key=checkpoint_step_order)


def latest_checkpoint(run_url: str, store: Store = Store()) -> str | None:
    """URL of a run's newest good checkpoint (the highest step), if any.  Damaged ones are
    skipped with a warning; a store that cannot be read is retried, never taken for damage."""
    for name in reversed(checkpoint_names(run_url, store)):
        url = run_url.rstrip("/") + "/" + name
        problem = _retried("check checkpoint", url, lambda: checkpoint_problem(url, store))
        if problem is None:
            return url
        log.warning("skipping checkpoint %s: %s", url, problem)
    return None


def load_payload(url: str, store: Store = Store()) -> dict:
    """The contents of a checkpoint's model.pt at any storage URL, tensors on the CPU."""
    try:
        fs, path = store.fs(url.rstrip("/") + "/" + MODEL_FILE)
        if not fs.exists(path):
            raise CheckpointError(f"no checkpoint at {url} ({MODEL_FILE} not found); check the URL")
        data = fs.cat_file(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read checkpoint {describe_error(url, exc)}") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{url}/{MODEL_FILE} is not a readable charnn checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{url}/{MODEL_FILE} is not a {FORMAT} file")
    return payload


def load_model(url: str, store: Store = Store()) -> tuple[CharGRU, dict]:
    """The model of a checkpoint at any storage URL, on the CPU, in eval mode."""
    payload = load_payload(url, store)
    model = CharGRU(saved_shape(payload, url))
    model.load_state_dict(payload["model"])
    return model.eval(), payload


# What a resumed run must share with the run it resumes, besides the model's shape and alphabet
# and the data stream; everything else (steps, cadences, workers, storage) may change.
RESUME_SETTINGS = ("model.dropout", "train.lr", "train.warmup_steps", "train.schedule", "train.min_lr_ratio",
                   "train.grad_clip", "train.epoch_state", "train.seed", "train.first_step")


def resume_settings(spec) -> dict:
    return {key: getattr(getattr(spec, key.split(".")[0]), key.split(".")[1]) for key in RESUME_SETTINGS}


def resume_differences(payload: dict, stream: str, settings: dict) -> list[str]:
    """What differs between a checkpoint and the run that would resume it (checkpoints from
    before these were recorded are taken as they are)."""
    differences = []
    if payload.get("stream", stream) != stream:
        differences.append("the data (its documents, their splits, data.seq_len or the rows R)")
    saved = payload.get("settings", {})
    differences += [f"{key} ({saved[key]!r} now {value!r})" for key, value in settings.items()
                    if key in saved and saved[key] != value]
    return differences


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_unusable_ray_snapshot(run_url: str, store: Store = Store()) -> None:
    """Move Ray Train's record of a run aside when Ray could not load it (not JSON, another Ray
    version, a checkpoint it names is gone): Ray would refuse to start, and advise deleting the
    whole run.  Nothing is lost: the workers resume from the run directory's own checkpoints."""
    from importlib.metadata import version

    fs, path = store.fs(run_url.rstrip("/") + "/" + RAY_SNAPSHOT)
    try:
        snapshot = json.loads(fs.cat_file(path))
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
        problem = (f"it was written by Ray {snapshot.get('ray_version')}" if snapshot.get("ray_version") != version("ray")
                   else next((f"it names {n}, which is gone" for n in names if not fs.exists(path.rsplit("/", 1)[0] + "/" + n)), None))
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"it cannot be read ({type(exc).__name__})"
    if problem:
        aside = f"{path}.unusable-{int(time.time())}"
        fs.mv(path, aside)
        log.warning("Ray Train's record of %s is unusable (%s): moved to %s; the run resumes from its newest good "
                    "checkpoint", run_url, problem, aside.rsplit("/", 1)[-1])
