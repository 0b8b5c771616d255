"""A run's checkpoints: saved at the spec's cadence, and the newest good one resumed.

Every rank saves the hidden states of its own rows and its RNG state, rank 0 the weights and
the optimiser, and each rank seals its files with their checksums (``charnn.checkpoint`` holds
the format); the framework stores them as one directory, named by step and attempt.  On a
(re)start rank 0 picks the checkpoint to resume for every rank.

One job trains a run at a time: its driver holds the run directory's lease (``RunDirectory``), and
the workers save only while no newer lease exists, so the workers of a job that lost its run (a
driver frozen past its lease while another job took over) never write into it.
"""
from __future__ import annotations

import dataclasses
import tempfile

import torch

from charnn import checkpoint as ckpt
from charnn.errors import Busy
from charnn.lease import LeasedDirectory
from charnn.model import ModelShape
from charnn.storage import StorageError, Store, basename
from charnn.train.context import WorkerContext
from charnn.train.faults import inject
from charnn.log import say
from charnn.train.state import TrainState
from charnn.train.step import Parts


class RunBusy(Busy):
    """Another job trains this run (its lease is live, or newer than this job's); exit 75."""


class RunDirectory(LeasedDirectory):
    """A run's directory, ``<run.storage>/<run.name>``: one job trains it at a time, so that two jobs
    never resume, write and report each other's checkpoints."""

    Busy = RunBusy
    writer = "job training this run"


class Checkpointer:
    def __init__(self, run_url: str, store: Store, context: WorkerContext, every: int, lease: int | None = None):
        """``lease``: the run lease its job's driver holds; checkpoints are written only while it is the newest."""
        self.run_url, self.store, self.context, self.every, self.lease = run_url, store, context, every, lease
        self.attempt = ""

    def should_save(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def resume(self, parts: Parts, shape: tuple[ModelShape, str], rows: range) -> tuple[TrainState, torch.Tensor] | None:
        """Load the run's newest good checkpoint into ``parts``: (its state, the hidden states of
        ``rows``), or None for a fresh run.  ``shape`` is the (model shape, alphabet) it must have."""
        url = self._agree_on_resume()
        if url is None:
            return None
        with self.store.local_dir(url) as directory:
            meta, weights = ckpt.load_model_file(directory)
            ckpt.check_compatible(meta, *shape)
            if meta.state is None:
                raise ckpt.CheckpointError(f"{url} records no step: not a checkpoint of a run; use another one")
            _load_into(parts, directory, weights, self.context.rank)
            states = ckpt.load_row_states(directory, rows).to(self.context.device)
        return meta.state, states

    def save(self, state: TrainState, parts: Parts, carried: tuple[range, torch.Tensor],
             meta: ckpt.CheckpointMeta, final: dict | None = None) -> None:
        """Save the rows ``carried`` holds (and, on rank 0, the model, recorded as ``meta`` says with
        ``state``) and report them with the state's figures (and, at the run's end, its ``final`` words)."""
        rank, world = self.context.rank, self.context.world
        self._refuse_if_taken_over()
        with tempfile.TemporaryDirectory(prefix="charnn-ckpt-") as directory:
            ckpt.save_rank_files(directory, rank, *carried)
            if rank == 0:
                model = getattr(parts.model, "module", parts.model)  # DDP holds the model itself
                ckpt.save_model_files(directory, model, parts.optimizer, parts.scheduler,
                                      dataclasses.replace(meta, state=state, attempt=self.attempt))
            ckpt.save_checksums(directory, rank, world)
            inject("kill-in-checkpoint", state.step, rank)
            self.context.report(state.figures.to_metrics() | (final or {}), directory,
                                ckpt.checkpoint_name(state.step, self.attempt))

    def _refuse_if_taken_over(self) -> None:
        """Stop, on every rank, if another job has taken this run over since this job's driver took its
        lease: rank 0 looks, and tells the others (checkpoint steps sync anyway)."""
        if self.lease is None:
            return
        newest = [None]
        if self.context.rank == 0:
            numbers = RunDirectory(self.run_url, self.store).lease_numbers()
            newest[0] = numbers[-1] if numbers else None
        newest = self.context.broadcast(newest)
        if newest[0] is not None and newest[0] > self.lease:
            raise RunBusy(f"another job took run {self.run_url} over (lease {newest[0]}; this job holds {self.lease}); "
                          f"this one stops without saving")

    def _agree_on_resume(self) -> str | None:
        """The checkpoint to resume from, decided by rank 0 for every rank (ranks that each chose
        for themselves could resume different weights, or hang in a collective, after a read error
        on one of them); also this attempt's id, which names the checkpoints it writes.

        Rank 0 takes the run directory's newest good checkpoint.  It may be newer than the one the
        framework registered, when a worker died between saving a checkpoint and the controller
        registering it; or older, when the registered one was damaged afterwards."""
        choice = [None, None, None]
        if self.context.rank == 0:
            try:
                choice[0] = ckpt.latest_checkpoint(self.run_url, self.store)
                choice[1] = ckpt.new_attempt(choice[0] and basename(choice[0]))
                self._say_if_not_registered(choice[0])
            except (ckpt.CheckpointError, StorageError) as exc:
                choice[2] = exc
        choice = self.context.broadcast(choice)
        if choice[2] is not None:
            raise choice[2]
        self.attempt = choice[1]
        return choice[0]

    def _say_if_not_registered(self, url: str | None) -> None:
        theirs, name = self.context.registered_checkpoint(), url and basename(url)
        if theirs and url is None:
            raise ckpt.CheckpointError(f"checkpoint {theirs} of {self.run_url} is damaged and no earlier one is "
                                       f"good; delete {self.run_url} to start over")
        if theirs and name != theirs:
            newer = ckpt.checkpoint_step_order(name) > ckpt.checkpoint_step_order(theirs)
            why = "is older than one saved but not yet registered" if newer else "is damaged"
            say(f"charnn: warning: checkpoint {theirs} {why}; resuming from {name}")


def _load_into(parts: Parts, directory: str, weights: dict, rank: int) -> None:
    getattr(parts.model, "module", parts.model).load_state_dict(weights)
    saved = ckpt.load_optimizer_file(directory)
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    rng = ckpt.load_rng_file(directory, rank)
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

