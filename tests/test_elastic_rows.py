"""Elastic training's arithmetic, without Ray Train: the same R rows trained by any number of
workers W (rows split unevenly when W does not divide R, each rank's loss weighted) give the same
run, and a run resumes on another W exactly.  Each group is W real ranks (torch.distributed over
gloo on 127.0.0.1, one process each) running the Trainer with a ``LocalContext``, on a dataset laid
out for 2 workers x 4 rows."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.layout import loss_weight, worker_rows
from charnn.storage import Store
from charnn.train.context import LocalContext
from charnn.train.metrics import read_points
from charnn.train.trainer import Trainer
from support.jobs import write_corpus
from support.ranks import REFERENCE, final_weights, same_run, smoke

pytestmark = pytest.mark.ray  # the slow tier: each group is processes of its own (no Ray)


def rank_main(rank: int, world: int, root, url: str, name: str, overrides: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{name}-{world}", rank=rank,
                            world_size=world)
    try:
        context = LocalContext(str(root / "runs" / name), Store(), rank=rank, world=world)
        Trainer(smoke(root, name, *overrides), url, context).train()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(root, url: str, name: str, world: int, *overrides: str) -> dict[int, float]:
    """Run ``name`` on ``world`` ranks; its train loss by step, as rank 0 logged it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(rank_main, args=(world, root, url, name, overrides), nprocs=world, join=True)
    return {p.step: p.loss for p in read_points(Store(), str(root / "runs" / name))["train"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root, build_dataset(DatasetRequest.from_spec(smoke(root, "any"))).url


@pytest.fixture(scope="module")
def laid_out(dataset):
    """The run on the 2 workers the dataset was laid out for: the reference."""
    root, url = dataset
    return train(root, url, REFERENCE, 2)


def test_uneven_rows_differ_by_at_most_one_and_their_weights_make_the_mean_over_all_rows():
    row_losses = torch.rand(200, dtype=torch.float64)
    for rows, world in ((8, 3), (8, 5), (7, 7), (200, 3), (8, 2)):
        owned = [worker_rows(rows, world, r) for r in range(world)]
        assert [i for r in owned for i in r] == list(range(rows)) and max(map(len, owned)) - min(map(len, owned)) <= 1
        # DDP averages the ranks' gradients (so their weighted mean losses): that is the mean over every row
        ranks = [loss_weight(rows, world, r) * row_losses[list(owned[r])].mean() for r in range(world)]
        assert float(sum(ranks) / world) == pytest.approx(float(row_losses[:rows].mean()), rel=1e-12)
    assert loss_weight(8, 2, 1) == 1.0


@pytest.mark.parametrize("world", [1, 3])
def test_any_number_of_workers_trains_the_same_run(dataset, laid_out, world):
    root, url = dataset
    same_run(root, f"w{world}", train(root, url, f"w{world}", world), laid_out)


@pytest.mark.parametrize("before, after", [(3, 1), (1, 3)])
def test_a_run_resumes_on_another_number_of_workers_exactly(dataset, laid_out, before, after):
    """What an elastic group does when it shrinks or grows: it resumes the latest checkpoint."""
    root, url = dataset
    name = f"resized-{before}-{after}"
    train(root, url, name, before, "train.steps=12", "train.checkpoint_every=6")
    losses = train(root, url, name, after, "train.checkpoint_every=6")
    same_run(root, name, losses, laid_out)
    workers = final_weights(root, name)["history"]["workers"]
    assert workers == [[0, before], [12, after]]
