"""The collectives a training rank takes part in, over a torch.distributed group or over W
simulated ranks in this one process.

Every rank calls the same collectives in the same order (a rank that skipped one would hang the
others), so the Trainer and its parts call them through their ``WorkerContext``, never through
``torch.distributed``: then ``SimulatedRanks`` can stand in for the process group, and a test
trains W ranks in one process, in seconds, with the very code that Ray Train's workers run.
"""
from __future__ import annotations

import pickle
import random
import threading
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


class Collectives(Protocol):
    rank: int
    world: int
    device: torch.device

    def all_sum(self, values: list[float] | torch.Tensor) -> list[float]:
        """Every rank's ``values`` summed, element by element (a tensor of them may stay on the
        device: the result is the one host sync)."""

    def all_max(self, values: list[float] | torch.Tensor) -> list[float]:
        """The largest of every rank's ``values``, element by element."""

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order."""

    def broadcast(self, objects: list) -> list:
        """Rank 0's ``objects`` (picklable), on every rank."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class TorchCollectives:
    """The collectives over the torch.distributed group this process is a rank of (Ray Train sets
    one up on its workers; a test may set one up itself), or over this rank alone when there is
    none.  A subclass gives ``device``."""

    device: torch.device

    def all_sum(self, values: list[float] | torch.Tensor) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def all_max(self, values: list[float] | torch.Tensor) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float] | torch.Tensor, op) -> list[float]:
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if distributed():
            dist.all_reduce(t, op=op)
        return t.tolist()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if not distributed():
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return out

    def broadcast(self, objects: list) -> list:
        if distributed():
            dist.broadcast_object_list(objects, src=0)
        return objects


class ProcessGroup(TorchCollectives):
    """This process's collectives where no ``WorkerContext`` is at hand (a script, a test)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.rank = dist.get_rank() if distributed() else 0
        self.world = dist.get_world_size() if distributed() else 1


class RankFailed(RuntimeError):
    """A simulated rank waited in a collective that another rank will never reach (it returned or
    raised first): where real ranks would hang, the simulated ones stop."""


def _rng_state() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


class SimulatedRanks:
    """W ranks in one process: ``run(work)`` runs ``work(rank)`` for each rank in a thread of its
    own, and the threads take turns: a rank runs until it reaches a collective, then the next rank
    runs; the last to arrive combines their values, and each takes the result when its turn comes
    again.  Taking turns makes a run deterministic, and lets each rank keep its own random state
    (torch's, numpy's and Python's, swapped at each turn), as W processes would: the Trainer seeds
    its weights and then its rank's dropout stream from the process-wide generators."""

    def __init__(self, world: int):
        if world < 1:
            raise ValueError(f"a group has at least one rank, not {world}")
        self.world, self._turn, self._cond = world, 0, threading.Condition()
        self._slots: list = [None] * world
        self._arrived, self._generation, self._result = 0, 0, None
        self._finished = [False] * world
        self._rng: list = [None] * world

    def run(self, work: Callable[[int], T]) -> list[T]:
        """Each rank's ``work(rank)``, in rank order; or, once every rank has ended, the error of the
        first rank that raised one of its own."""
        before = _rng_state()
        self._rng = [before] * self.world  # each rank starts from this process's random state
        self._turn, self._arrived, self._finished = 0, 0, [False] * self.world  # a group may run again
        results: list = [None] * self.world
        errors: list = [None] * self.world
        threads = [threading.Thread(target=self._rank_main, args=(rank, work, results, errors),
                                    name=f"simulated-rank-{rank}", daemon=True) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _set_rng_state(before)
        # a rank's own error first: the others' RankFailed only says that it left them waiting
        failed = [error for error in errors if error is not None]
        if failed:
            raise next((error for error in failed if not isinstance(error, RankFailed)), failed[0])
        return results

    def _rank_main(self, rank: int, work: Callable[[int], T], results: list, errors: list) -> None:
        try:
            with self._cond:
                self._cond.wait_for(lambda: self._turn == rank)
                _set_rng_state(self._rng[rank])
            results[rank] = work(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to run(), which raises the first rank's
            errors[rank] = exc
        finally:
            with self._cond:
                self._finished[rank] = True
                self._pass_turn(rank)

    def _pass_turn(self, rank: int) -> None:
        for step in range(1, self.world + 1):
            following = (rank + step) % self.world
            if not self._finished[following]:
                self._turn = following
                break
        self._cond.notify_all()

    def exchange(self, rank: int, kind: str, value, combine: Callable[[list], object]):
        """Rank ``rank``'s part in a collective: ``combine`` (every rank's ``value``, in rank order)
        once all have given theirs.  ``kind`` names the collective, so that ranks that call
        different ones fail here rather than mix their values."""
        with self._cond:
            generation = self._generation
            self._slots[rank] = (kind, value)
            self._arrived += 1
            if self._arrived == self.world:
                self._result = self._combine(combine)
                self._arrived, self._generation = 0, generation + 1
            self._rng[rank] = _rng_state()
            self._pass_turn(rank)
            self._cond.wait_for(lambda: self._turn == rank)
            _set_rng_state(self._rng[rank])
            if self._generation == generation:
                left = [r for r in range(self.world) if self._finished[r]]
                raise RankFailed(f"simulated rank {rank} waits in {kind}, which rank {left[0]} left before reaching")
            ok, result = self._result
        if not ok:
            raise RankFailed(result)
        return result

    def _combine(self, combine: Callable[[list], object]) -> tuple[bool, object]:
        kinds = [kind for kind, _ in self._slots]
        if len(set(kinds)) > 1:
            return False, f"the simulated ranks called different collectives at once: {kinds}"
        return True, combine([value for _, value in self._slots])


@dataclass
class SimulatedCollectives:
    """One rank's collectives in a ``SimulatedRanks`` group; the values go as torch.distributed
    would send them (sums in float64, objects pickled)."""

    ranks: SimulatedRanks
    rank: int

    def all_sum(self, values: list[float] | torch.Tensor) -> list[float]:
        return self._reduce("all_sum", values, lambda ts: torch.stack(ts).sum(0))

    def all_max(self, values: list[float] | torch.Tensor) -> list[float]:
        return self._reduce("all_max", values, lambda ts: torch.stack(ts).amax(0))

    def _reduce(self, kind: str, values: list[float] | torch.Tensor, combine) -> list[float]:
        mine = torch.as_tensor(values, dtype=torch.float64).detach().cpu().clone()
        return self.ranks.exchange(self.rank, kind, mine, combine).tolist()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = self.ranks.exchange(self.rank, "all_gather", tensor.detach().clone(), list)
        return [t.clone() for t in gathered]

    def broadcast(self, objects: list) -> list:
        return pickle.loads(self.ranks.exchange(self.rank, "broadcast", pickle.dumps(objects), lambda ps: ps[0]))

    def mean_gradients(self, grads: torch.Tensor) -> torch.Tensor:
        """The mean of every rank's flattened gradients: what DDP's all-reduce leaves on each rank."""
        return self.ranks.exchange(self.rank, "gradients", grads.detach().clone(),
                                   lambda ts: torch.stack(ts).sum(0) / len(ts)).clone()


class SimulatedDDP(torch.nn.Module):
    """DDP for a simulated rank: the module's gradients, once its backward has accumulated all of
    them, are replaced by their mean over the ranks, as DDP's all-reduce leaves them (before the
    step clips them and the optimiser applies them).  The ranks start from the same weights (the
    Trainer seeds them alike), so, like DDP, it need not broadcast rank 0's."""

    def __init__(self, module: torch.nn.Module, collectives: SimulatedCollectives):
        super().__init__()
        self.module, self.collectives = module, collectives
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._pending = len(self._params)
        for param in self._params:
            param.register_post_accumulate_grad_hook(self._accumulated)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _accumulated(self, _param: torch.Tensor) -> None:
        self._pending -= 1
        if self._pending:
            return
        self._pending = len(self._params)
        grads = [p.grad for p in self._params]
        mean = self.collectives.mean_gradients(torch.cat([g.reshape(-1) for g in grads]))
        for grad, part in zip(grads, mean.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))
