"""Checkpoint files: plain tensors and dicts, loadable with ``torch.load(weights_only=True)``.

A checkpoint directory holds ``model.pt`` (the weights and their ``CheckpointMeta``: shape,
alphabet, spec, dataset, the run's state and figures) and ``optimizer.pt`` from rank 0, plus from
every rank the hidden states of the rows it owns (``carry-rows-<first>-<stop>.pt``), its RNG state
(``rng-rank<r>.pt``) and, written last, the SHA-256 of each of its files (``checksums-rank<r>.json``).
Ray Train merges the ranks' files into one directory.  Hidden states are stored per row, so a run
can resume on another number of workers.  A checkpoint whose checksums are missing or do not match
(damaged, or written by a save that was interrupted) is skipped in favour of the previous good one.
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
from dataclasses import dataclass, field

import torch

from charnn.config import fields_with_role, role_settings
from charnn.errors import UserError
from charnn.storage import StorageError, Store, describe_error, join
from charnn.model import CharGRU, ModelShape
from charnn.train.state import TrainState

FORMAT_NAME = "charnn.checkpoint"
FORMAT = f"{FORMAT_NAME}/1"
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


@dataclass(frozen=True)
class DatasetRef:
    """The dataset version a checkpoint was trained on."""

    url: str
    documents: int | None = None  # in that version


@dataclass
class CheckpointMeta:
    """What a checkpoint's ``model.pt`` records besides the weights: the model it is, the run that
    wrote it and where that run is.  ``to_payload`` writes the keys model.pt has always had (format
    charnn.checkpoint/1), and ``from_payload`` reads those of any version: a key that an older
    checkpoint lacks is None (or empty), and is then not compared on a resume."""

    shape: ModelShape
    alphabet: str
    spec: str | None = None  # the run's spec, as ``dump_spec`` wrote it
    stream: str | None = None  # the digest of the data stream it was trained on
    settings: dict = field(default_factory=dict)  # ``resume_settings`` of its spec
    dataset: DatasetRef | None = None
    state: TrainState | None = None  # None: a bare model (no run wrote it)
    attempt: str | None = None  # the id of the attempt that wrote it
    version: int = 1  # the N of charnn.checkpoint/N

    @property
    def step(self) -> int:
        return self.state.step if self.state else 0

    def to_payload(self, weights: dict) -> dict:
        payload = {"format": f"{FORMAT_NAME}/{self.version}", "model": weights, "shape": self.shape.to_dict(),
                   "alphabet": self.alphabet, "spec": self.spec, "stream": self.stream, "settings": self.settings,
                   "dataset": self.dataset and {"url": self.dataset.url, "documents": self.dataset.documents}}
        payload = {key: value for key, value in payload.items() if value is not None}
        return payload | (self.state.payload() if self.state else {}) | {"attempt": self.attempt}

    @classmethod
    def from_payload(cls, payload: dict, where: str) -> "CheckpointMeta":
        """The record of a model.pt's contents (checked to be a charnn checkpoint; the weights are left
        to the loaders, which compare them with the shape)."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a {FORMAT} file")
        try:
            dataset = payload.get("dataset")
            return cls(ModelShape(**payload["shape"]), payload["alphabet"], payload.get("spec"), payload.get("stream"),
                       payload.get("settings") or {}, DatasetRef(dataset["url"], dataset.get("documents")) if dataset
                       else None, TrainState.from_payload(payload) if "step" in payload else None,
                       payload.get("attempt"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{where} is not a readable charnn checkpoint ({type(exc).__name__}: {exc}); "
                                  f"use another checkpoint") from None


def save_model_files(directory: str, model: CharGRU, optimizer, scheduler, meta: CheckpointMeta) -> None:
    torch.save(meta.to_payload(model.state_dict()), os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, OPTIMIZER_FILE))


@dataclass(frozen=True)
class Checksums:
    """``checksums-rank<r>.json``: how many ranks sealed the checkpoint, and the SHA-256 of each file
    of this rank's.  Read as found: a damaged file raises ValueError, KeyError or TypeError here or
    where it is used, and ``checkpoint_problem`` reports the checkpoint as unreadable."""

    world: int
    files: dict[str, str]  # file name: hex SHA-256

    def to_json(self) -> bytes:
        return json.dumps({"world": self.world, "files": self.files}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Checksums":
        raw = json.loads(data)
        return cls(raw["world"], raw["files"])


def save_checksums(directory: str, rank: int, world: int) -> None:
    """Seal this rank's files: called after it has written all of them."""
    files = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = hashlib.file_digest(f, "sha256").hexdigest()
    with open(os.path.join(directory, CHECKSUMS.format(rank=rank)), "wb") as f:
        f.write(Checksums(world, files).to_json())


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
    present = set(store.list(url, dirs=None))
    sums = sorted(n for n in present if n.startswith("checksums-rank"))
    if not sums:
        return "it has no checksums-rank*.json (its save did not finish)"
    try:
        world = Checksums.from_json(store.read(join(url, sums[0]))).world
        for rank in range(world):
            name = CHECKSUMS.format(rank=rank)
            if name not in present:
                return f"{name} is missing (rank {rank}'s save did not finish)"
            for file, digest in Checksums.from_json(store.read(join(url, name))).files.items():
                if file not in present:
                    return f"{file} is missing"
                if file_sha256(store, join(url, file)) != digest:
                    return f"{file} does not match its checksum (damaged or partly written)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"its checksums cannot be read ({type(exc).__name__})"
    except FileNotFoundError as exc:
        return f"{_basename(str(exc.filename or exc))} vanished while it was checked"
    return None


def file_sha256(store: Store, url: str) -> str:
    """The SHA-256 of the file at ``url``, read in HASH_CHUNK blocks (optimizer.pt alone is twice the
    weights: read whole, a large model's would cost gigabytes on the driver and on rank 0)."""
    digest = hashlib.sha256()
    with store.open(url, "rb", block_size=HASH_CHUNK) as f:
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


def load_model_file(directory: str) -> tuple[CheckpointMeta, dict]:
    """(the record, the weights) of the model.pt in a local checkpoint directory."""
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {MODEL_FILE}: not a charnn checkpoint")
    payload = _load(path)
    return _checked(payload, path, "the checkpoint"), payload["model"]


def _checked(payload: dict, path: str, where: str) -> CheckpointMeta:
    """The record of a model.pt at ``path``, its weights checked against the shape it declares before
    anything of that size is allocated (``where`` names it in that check's errors)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    meta = CheckpointMeta.from_payload(payload, where)
    try:
        found = {name: tuple(tensor.shape) for name, tensor in payload["model"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where} is not a readable charnn checkpoint ({type(exc).__name__}: {exc}); "
                              f"use another checkpoint") from None
    if found != CharGRU.parameter_shapes(meta.shape):
        raise CheckpointError(f"{where}: its weights do not match the shape it declares ({meta.shape}); "
                              f"use another checkpoint")
    return meta


def check_compatible(meta: CheckpointMeta, shape: ModelShape, alphabet: str) -> None:
    if meta.shape != shape or meta.alphabet != alphabet:
        raise CheckpointError(
            f"checkpoint is a {meta.alphabet} model {meta.shape}, the spec asks for {alphabet} {shape}; "
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
    found = _retried("list the checkpoints of", run_url, lambda: store.list(run_url, dirs=True))
    return sorted((n for n in found if n.startswith("checkpoint_")), key=checkpoint_step_order)


def latest_checkpoint(run_url: str, store: Store = Store()) -> str | None:
    """URL of a run's newest good checkpoint (the highest step), if any.  Damaged ones are
    skipped with a warning; a store that cannot be read is retried, never taken for damage."""
    for name in reversed(checkpoint_names(run_url, store)):
        url = join(run_url, name)
        problem = _retried("check checkpoint", url, lambda: checkpoint_problem(url, store))
        if problem is None:
            return url
        log.warning("skipping checkpoint %s: %s", url, problem)
    return None


def load_payload(url: str, store: Store = Store()) -> dict:
    """The contents of a checkpoint's model.pt at any storage URL, tensors on the CPU, as the dict
    on disk (``load_meta`` reads it as a record)."""
    try:
        if not store.exists(join(url, MODEL_FILE)):
            raise CheckpointError(f"no checkpoint at {url} ({MODEL_FILE} not found); check the URL")
        data = store.read(join(url, MODEL_FILE))
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


def load_meta(url: str, store: Store = Store()) -> CheckpointMeta:
    """The record of a checkpoint's model.pt at any storage URL (its weights checked against it)."""
    return _checked(load_payload(url, store), f"{url}/{MODEL_FILE}", url)


def load_checkpoint(url: str, store: Store = Store()) -> tuple[CharGRU, CheckpointMeta]:
    """The model of a checkpoint at any storage URL, on the CPU, in eval mode, and its record."""
    model, meta, _ = _model_at(url, store)
    return model, meta


def load_model(url: str, store: Store = Store()) -> tuple[CharGRU, dict]:
    """``load_checkpoint``'s model with model.pt's dict as it is on disk (for readers of its keys)."""
    model, _, payload = _model_at(url, store)
    return model, payload


def _model_at(url: str, store: Store) -> tuple[CharGRU, CheckpointMeta, dict]:
    payload = load_payload(url, store)
    meta = _checked(payload, f"{url}/{MODEL_FILE}", url)
    model = CharGRU(meta.shape)
    model.load_state_dict(payload["model"])
    return model.eval(), meta, payload


# What a resumed run must share with the run it resumes, besides the model's shape and alphabet
# and the data stream: the spec's fields with the "resume" role (charnn.config); everything else
# (steps, cadences, workers, storage) may change.  Checkpoints record them by these dotted keys.
RESUME_SETTINGS = fields_with_role("resume")


def resume_settings(spec) -> dict:
    return role_settings(spec, "resume")


def resume_differences(meta: CheckpointMeta, stream: str | None, settings: dict) -> list[str]:
    """What differs between a checkpoint and the run that would resume it on the data ``stream`` (None:
    not known yet) with ``settings``; checkpoints from before these were recorded are taken as they are."""
    differences = []
    if None not in (meta.stream, stream) and meta.stream != stream:
        differences.append("the data (its documents, their splits, data.seq_len or the rows R)")
    differences += [f"{key} ({meta.settings[key]!r} now {value!r})" for key, value in settings.items()
                    if key in meta.settings and meta.settings[key] != value]
    return differences


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_unusable_ray_snapshot(run_url: str, store: Store = Store()) -> None:
    """Move Ray Train's record of a run aside when Ray could not load it (not JSON, another Ray
    version, a checkpoint it names is gone): Ray would refuse to start, and advise deleting the
    whole run.  Nothing is lost: the workers resume from the run directory's own checkpoints."""
    from importlib.metadata import version

    url = join(run_url, RAY_SNAPSHOT)
    try:
        snapshot = store.read_json(url)
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
        gone = (f"it names {n}, which is gone" for n in names if not store.exists(join(run_url, n)))
        problem = (f"it was written by Ray {snapshot.get('ray_version')}" if snapshot.get("ray_version") != version("ray")
                   else next(gone, None))
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"it cannot be read ({type(exc).__name__})"
    if problem:
        aside = f"{url}.unusable-{int(time.time())}"
        store.move(url, aside)
        log.warning("Ray Train's record of %s is unusable (%s): moved to %s; the run resumes from its newest good "
                    "checkpoint", run_url, problem, aside.rsplit("/", 1)[-1])
