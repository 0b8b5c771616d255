"""W ranks simulated in one process (``LocalContext.simulated``): their collectives give what
torch.distributed gives, a rank that leaves early stops the others instead of hanging them, and
the Trainer on W = 1, 2 or 3 of them trains the run laid out for 2 workers, and resumes it on
another W, as tests/test_elastic_rows.py checks with real gloo ranks (there in about a minute).
No Ray: the dataset is built in this process too."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.runners import InProcess
from charnn.storage import Store
from charnn.train.collectives import RankFailed, SimulatedRanks
from charnn.train.context import LocalContext, run_ranks
from charnn.train.metrics import read_points
from charnn.train.trainer import Trainer
from support.jobs import write_corpus
from support.ranks import REFERENCE, final_weights, same_run, smoke


def contexts(world: int, tmp_path) -> list[LocalContext]:
    return LocalContext.simulated(str(tmp_path / "run"), world)


def test_the_collectives_combine_every_ranks_values_in_rank_order(tmp_path):
    def work(context: LocalContext):
        rank = context.rank
        return (context.all_sum([rank, 1.5]), context.all_max([rank, -rank]),
                [t.tolist() for t in context.all_gather(torch.tensor([rank, 10 * rank]))],
                context.broadcast([f"from {rank}", {"rank": rank}]),
                context.all_sum(torch.tensor([True, rank == 2])))

    results = run_ranks(contexts(3, tmp_path), work)
    assert results == [([3.0, 4.5], [2.0, 0.0], [[0, 0], [1, 10], [2, 20]], ["from 0", {"rank": 0}], [3.0, 1.0])] * 3


def test_each_rank_keeps_its_own_random_streams_whatever_the_order_of_turns(tmp_path):
    def work(context: LocalContext):
        torch.manual_seed(100 + context.rank)
        np.random.seed(100 + context.rank)
        random.seed(100 + context.rank)
        draws = []
        for _ in range(3):
            draws.append((torch.rand(2).tolist(), np.random.rand(), random.random()))
            context.all_sum([0.0])  # the other ranks draw in between
        return draws

    def alone(seed: int):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return [(torch.rand(2).tolist(), np.random.rand(), random.random()) for _ in range(3)]

    expected = [alone(100 + rank) for rank in range(3)]
    before = torch.get_rng_state()
    assert run_ranks(contexts(3, tmp_path), work) == expected
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is left as it was


def test_a_rank_that_fails_or_leaves_stops_the_others_instead_of_hanging_them():
    def one_fails(rank: int):
        if rank == 1:
            raise KeyError("rank 1's own error")
        return ranks.exchange(rank, "all_sum", rank, sum)

    def one_leaves(rank: int):
        return None if rank == 1 else ranks.exchange(rank, "all_sum", rank, sum)

    ranks = SimulatedRanks(3)
    with pytest.raises(KeyError, match="rank 1's own error"):  # the cause, not the others' stopping
        ranks.run(one_fails)
    ranks = SimulatedRanks(3)
    with pytest.raises(RankFailed, match="simulated rank 0 waits in all_sum, which rank 1 left before reaching"):
        ranks.run(one_leaves)
    ranks = SimulatedRanks(2)
    with pytest.raises(RankFailed, match="called different collectives at once"):
        ranks.run(lambda rank: ranks.exchange(rank, "all_sum" if rank else "broadcast", rank, sum))


def test_simulated_ddp_leaves_every_rank_the_mean_of_their_gradients(tmp_path):
    def work(context: LocalContext):
        torch.manual_seed(0)
        model = context.wrap(torch.nn.Linear(3, 2))
        x = torch.full((4, 3), float(context.rank + 1))
        model(x).sum().backward()
        return [p.grad.clone() for p in model.module.parameters()]

    grads = run_ranks(contexts(3, tmp_path), work)
    # d(sum of outputs)/dW is the inputs' column sums: 4 * (rank + 1) per entry, so the mean is 4 * 2
    assert all(torch.equal(g[0], torch.full((2, 3), 8.0)) and torch.equal(g[1], torch.full((2,), 4.0)) for g in grads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 workers x 4 rows, built in this process."""
    root = tmp_path_factory.mktemp("simulated")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root, build_dataset(DatasetRequest.from_spec(smoke(root, "any")), runner=InProcess()).url


def train(dataset, name: str, world: int, *overrides: str) -> dict[int, float]:
    """Run ``name`` on ``world`` simulated ranks; its train loss by step, as rank 0 logged it."""
    root, url = dataset
    ranks = LocalContext.simulated(str(root / "runs" / name), world)
    run_ranks(ranks, lambda context: Trainer(smoke(root, name, *overrides), url, context).train())
    return {p.step: p.loss for p in read_points(Store(), str(root / "runs" / name))["train"]}


@pytest.fixture(scope="module")
def laid_out(dataset):
    """The run on the 2 ranks the dataset was laid out for: the reference."""
    return train(dataset, REFERENCE, 2)


@pytest.mark.parametrize("world", [1, 3])
def test_any_number_of_simulated_ranks_trains_the_same_run(dataset, laid_out, world):
    same_run(dataset[0], f"w{world}", train(dataset, f"w{world}", world), laid_out)
    checkpoint = sorted((dataset[0] / "runs" / f"w{world}").glob("checkpoint_*"))[-1]
    assert sorted(p.name for p in checkpoint.glob("checksums-rank*.json")) == [
        f"checksums-rank{rank:04d}.json" for rank in range(world)]


def test_a_run_resumes_on_another_number_of_simulated_ranks_exactly(dataset, laid_out):
    train(dataset, "resized", 3, "train.steps=12", "train.checkpoint_every=6")
    losses = train(dataset, "resized", 1, "train.checkpoint_every=6")
    same_run(dataset[0], "resized", losses, laid_out)
    assert final_weights(dataset[0], "resized")["history"]["workers"] == [[0, 3], [12, 1]]
