"""Two ranks (torch.distributed over gloo on 127.0.0.1, two processes, no Ray) whose clocks and
weights differ: they agree on one training clock, so they apply one learning rate (audit N-10),
and they stop a diverged run together, at the same step (N-3)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from charnn.model import CharGRU, ModelShape
from charnn.train.collectives import ProcessGroup
from charnn.train.optim import TimeBudget, make_optimizer, pace
from charnn.train.step import TrainingDiverged, check_weights_and_loss

WORLD = 2
CLOCKS = (10.0, 40.0)  # seconds of training clock on rank 0 and rank 1
TRAIN = SimpleNamespace(lr=0.01, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)


def learning_rates(budget: TimeBudget, clock: float) -> list[float]:
    """The rates three steps leave for the next, the second a log step (where the Trainer agrees
    on the clock and paces the schedule by it)."""
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), TRAIN, None, False, budget.progress)
    rates = []
    for log_step in (False, True, False):
        optimizer.step()
        scheduler.step()
        if log_step:
            budget.agree(clock, ProcessGroup())
            pace(scheduler)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def divergence(rank: int) -> str | None:
    """The guard's answer when only rank 1's weights hold a NaN."""
    torch.manual_seed(0)
    model = CharGRU(ModelShape(8, 4, 1))
    if rank == 1:
        with torch.no_grad():
            model.head.bias[0] = float("nan")
    try:
        check_weights_and_loss(model, torch.tensor(1.5), 30, ProcessGroup())
    except TrainingDiverged as exc:
        return str(exc)
    return None


def rank_main(rank: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    try:
        budget = TimeBudget(seconds=60.0)
        figures = {"rates": learning_rates(budget, CLOCKS[rank]), "agreed": budget.agreed,
                   "diverged": divergence(rank)}
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
            json.dump(figures, f)
        dist.barrier()  # a rank that left while the other still exchanged the last reduction would abort it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        mp.spawn(rank_main, args=(str(directory),), nprocs=WORLD, join=True)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_ranks_with_different_clocks_agree_on_one_clock_and_one_learning_rate(two_ranks):
    assert [r["agreed"] for r in two_ranks] == [max(CLOCKS)] * WORLD
    first, second = (r["rates"] for r in two_ranks)
    assert first == second  # the same rate on both replicas, step by step
    assert first[0] == TRAIN.lr and first[1] < first[0] and first[2] == first[1]  # it moved only once agreed


def test_weights_that_diverged_on_one_rank_stop_every_rank_at_the_same_step(two_ranks):
    messages = [r["diverged"] for r in two_ranks]
    assert messages[0] == messages[1] and messages[0].startswith("training diverged: the weights are not finite")
    assert "at step 30" in messages[0]


def test_one_rank_agrees_with_itself():
    budget = TimeBudget(seconds=60.0)
    assert not budget.agree(12.5, ProcessGroup()) and budget.agreed == 12.5 and budget.progress() == 12.5 / 60
    assert budget.agree(60.0, ProcessGroup()) and budget.spent() and budget.progress() == 1.0
