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

from charnn.spec_loader import load_spec
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.layout import loss_weight, worker_rows
from charnn.storage import Store
from charnn.train.context import LocalContext
from charnn.train.metrics import read_points
from charnn.train.trainer import Trainer
from support.jobs import write_corpus

pytestmark = pytest.mark.ray  # the dataset is built by Ray tasks; the training is not
STEPS = 30  # 24 steps an epoch: the runs cross an epoch boundary, where states move on one row


def smoke(root, name: str, *overrides: str):
    return load_spec("jobs/specs/smoke.yaml", [
        f"data.sources=[{root / 'corpus'}]", f"data.dataset_root={root / 'datasets'}",
        f"run.storage={root / 'runs'}", f"run.name={name}", "cluster.num_workers=2",
        "train.batch_per_worker=4", "train.log_every=1", "train.validate_every=0", "model.dropout=0.0",
        f"train.steps={STEPS}", *overrides])


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


def final_weights(root, name: str) -> dict:
    newest = sorted((root / "runs" / name).glob("checkpoint_*"))[-1]
    return torch.load(newest / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root, build_dataset(DatasetRequest.from_spec(smoke(root, "any"))).url


@pytest.fixture(scope="module")
def laid_out(dataset):
    """The run on the 2 workers the dataset was laid out for: the reference."""
    root, url = dataset
    return train(root, url, "two", 2)


def same_run(root, name: str, losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    ours, theirs = final_weights(root, name), final_weights(root, "two")
    assert ours["metrics"]["val_loss"] == pytest.approx(theirs["metrics"]["val_loss"], rel=1e-5)
    # Adam turns the float noise of a near-zero gradient (its summation order depends on the split)
    # into a step of up to lr: a few of the 9,408 weights differ by ~1e-4 after 30 steps
    for key, tensor in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], tensor, rtol=0, atol=1e-3)


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
