"""Where a Trainer runs: on one of Ray Train's workers, or in this process.

The Trainer asks its context for its rank, the world size and its device, for the checkpoint
that the framework registered, to report figures and checkpoints, and for the collectives
(``charnn.train.collectives``); nothing else in the training loop knows about Ray or
torch.distributed.  ``LocalContext`` runs the very same loop in one process with no Ray at all:
the benchmarks, the profiler, a GPU check, and tests of the loop itself, as one rank or as W
simulated ranks (``LocalContext.simulated``, ``run_ranks``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import torch

from charnn.storage import Store, basename, join
from charnn.train.collectives import (Collectives, ProcessGroup, SimulatedCollectives, SimulatedDDP, SimulatedRanks,
                                      TorchCollectives)

T = TypeVar("T")


class WorkerContext(Collectives, Protocol):
    rank: int
    world: int
    device: torch.device

    def registered_checkpoint(self) -> str | None:
        """The name of the checkpoint the framework would resume from, if any."""

    def report(self, metrics: dict, checkpoint: str | None = None, name: str | None = None) -> None:
        """Hand ``metrics`` (and the local checkpoint directory ``checkpoint``, to be stored as
        ``name`` in the run directory) to whoever runs the training."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the step should call it (DDP across workers)."""


class RayContext(TorchCollectives):
    """A Ray Train worker: ``ray.train``'s context, ``report``, DDP, and the collectives over the
    torch.distributed group that Ray Train's TorchTrainer sets up."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def registered_checkpoint(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint and basename(checkpoint.path)

    def report(self, metrics: dict, checkpoint: str | None = None, name: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None,
                         checkpoint_dir_name=name)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world > 1 else model


@dataclass
class LocalContext:
    """No Ray: one process, or one rank of a torch.distributed group that its caller set up, or one
    of W simulated ranks (``ranks``) in this process; a checkpoint is copied into the run
    directory, as Ray Train would upload it (every rank's files into one directory), and the
    reports are kept in ``reports``."""

    run_url: str
    store: Store = field(default_factory=Store)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    reports: list = field(default_factory=list)
    ranks: SimulatedRanks | None = None

    def __post_init__(self):
        self.collectives = SimulatedCollectives(self.ranks, self.rank) if self.ranks else ProcessGroup(self.device)

    @classmethod
    def simulated(cls, run_url: str, world: int, store: Store | None = None) -> list[LocalContext]:
        """The contexts of W simulated ranks of one group (on the CPU), for ``run_ranks``."""
        ranks = SimulatedRanks(world)
        return [cls(run_url, store or Store(), rank=rank, world=world, ranks=ranks) for rank in range(world)]

    def registered_checkpoint(self) -> str | None:
        return None

    def report(self, metrics: dict, checkpoint: str | None = None, name: str | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint:
            for file in sorted(os.listdir(checkpoint)):
                with open(os.path.join(checkpoint, file), "rb") as f:
                    self.store.write(join(self.run_url, name, file), f.read())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP when this process is one rank of a torch.distributed group, its simulation when it is
        one of simulated ranks (tests of W ranks without Ray)."""
        import torch.distributed as dist

        if self.ranks:
            return SimulatedDDP(model, self.collectives)
        return torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model

    def all_sum(self, values: list[float] | torch.Tensor) -> list[float]:
        return self.collectives.all_sum(values)

    def all_max(self, values: list[float] | torch.Tensor) -> list[float]:
        return self.collectives.all_max(values)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.collectives.all_gather(tensor)

    def broadcast(self, objects: list) -> list:
        return self.collectives.broadcast(objects)


def run_ranks(contexts: list[LocalContext], work: Callable[[LocalContext], T]) -> list[T]:
    """``work(context)`` on each of the simulated ranks ``LocalContext.simulated`` gave, together:
    their results in rank order, or the first rank's error."""
    return contexts[0].ranks.run(lambda rank: work(contexts[rank]))
