"""Where the pipeline's tasks run: as Ray Data tasks on the cluster (``RayTasks``), or one after
another in this process (``InProcess``).  Both run the same task functions (``operators.encode_block``
and ``operators.write_shard``) on the same plans, so a dataset is the same, byte for byte, either
way; what ``RayTasks`` adds is the cluster's CPUs, Ray Data's retries of a lost worker, and Ray
Data's start-up (seconds: more than a small corpus takes to encode).

``build_dataset(request, runner=...)`` takes one; without one, each stage takes
``default_runner``'s: this process for a stage of a small input (``data.in_process_mb``: a first
look at a corpus, a growth of a few files, the tests), Ray's tasks for a larger one, on the
cluster the job runs on (a local Ray where there is none).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Protocol

import pyarrow as pa

from charnn.data.operators import EncodeSource, ShardPlanRow, ShardSink, StageOptions, read, unreserved, write_shard
from charnn.data.stream import Stream
from charnn.storage import Store


class TaskRunner(Protocol):
    def cpus(self) -> int:
        """How many tasks run at once: the encode stage cuts its documents into a few tasks per CPU."""

    def encode(self, source: EncodeSource, stage: StageOptions) -> Iterable[pa.Table]:
        """The encode stage's blocks: each group's figures, with their ``position`` (in any order)."""

    def write_shards(self, plans: list[ShardPlanRow], streams: dict[str, Stream], store: Store,
                     commit: Callable[[list[str]], None], stage: StageOptions) -> None:
        """Write every shard of ``plans``, then ``commit(errors)`` (one "" per shard written)."""


class RayTasks:
    """Ray Data's read of ``EncodeSource`` and write of ``ShardSink``: tasks on the cluster's CPUs."""

    def cpus(self) -> int:
        import ray

        if not ray.is_initialized():  # a large corpus built without a cluster: a local Ray, as Ray Data starts one
            ray.init()
        return int(ray.cluster_resources().get("CPU", 1))

    def encode(self, source: EncodeSource, stage: StageOptions) -> Iterable[pa.Table]:
        return read(source, stage).iter_batches(batch_size=None, batch_format="pyarrow")

    def write_shards(self, plans: list[ShardPlanRow], streams: dict[str, Stream], store: Store,
                     commit: Callable[[list[str]], None], stage: StageOptions) -> None:
        import ray.data
        from ray.util.debug import log_once

        # Ray Data warns, once per process, that "the Dataset job will hang" when Ray reports no free
        # CPU as a write ends, which it does just after the write's own tasks: a false alarm here
        log_once("cpu_warning")
        rows = [dataclasses.asdict(plan) for plan in plans]
        unreserved(ray.data.from_items(rows, override_num_blocks=len(rows))).write_datasink(
            ShardSink(streams, store, commit), concurrency=stage.concurrency)


class InProcess:
    """Each task in turn, in this process: no Ray at all.  A task's error is raised as it is (Ray
    Data would retry a task whose worker died; here there is no worker to lose)."""

    def cpus(self) -> int:
        return 1

    def encode(self, source: EncodeSource, stage: StageOptions) -> Iterable[pa.Table]:
        return source.blocks_in_process()

    def write_shards(self, plans: list[ShardPlanRow], streams: dict[str, Stream], store: Store,
                     commit: Callable[[list[str]], None], stage: StageOptions) -> None:
        commit([write_shard(plan, streams, store) for plan in plans])


def default_runner(input_bytes: int, in_process_bytes: int) -> TaskRunner:
    """This process for a stage's input under ``in_process_bytes`` (Ray Data would take longer to
    start than the stage to run), Ray's tasks for a larger one (a local Ray where none is up)."""
    return InProcess() if input_bytes < in_process_bytes else RayTasks()


def stage_runner(stage: StageOptions, input_bytes: int) -> TaskRunner:
    """The runner of a stage of ``input_bytes``: the request's, else ``default_runner``'s."""
    return stage.runner or default_runner(input_bytes, stage.in_process_bytes)
