"""How well checkpoints do on a dataset's validation split, in this one process (no Ray Train):
what a scheduled retraining compares a candidate and the published model with."""
from __future__ import annotations

from charnn import checkpoint as ckpt
from charnn.data.dataset import load_manifest
from charnn.data.reader import SplitReader
from charnn.storage import Store
from charnn.train.figures import ValFigures
from charnn.train.collectives import ProcessGroup
from charnn.train.step import evaluate


def evaluate_checkpoints(urls: list[str], dataset_url: str, store: Store = Store()) -> list[ValFigures]:
    """Validation figures of each checkpoint over every validation row, in this one process.

    Every rank's rows hold the same number of tokens, so the mean of the ranks' means is the
    figure ``evaluate`` gives under Ray Train."""
    manifest = load_manifest(dataset_url, store)
    world = manifest.workers
    readers = [SplitReader(dataset_url, manifest, "val", rank, world, store) for rank in range(world)]
    figures = []
    for url in urls:
        model, meta = ckpt.load_checkpoint(url, store)
        if meta.alphabet != manifest.alphabet:
            raise ckpt.CheckpointError(f"{url} is a {meta.alphabet} model; the dataset is {manifest.alphabet}")
        per_rank = [evaluate(model, reader, ProcessGroup()) for reader in readers]
        figures.append(ValFigures(sum(f.loss for f in per_rank) / world, sum(f.accuracy for f in per_rank) / world))
    return figures
