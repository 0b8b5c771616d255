"""Driver side: a ``TorchTrainer`` over the spec's workers, storage and checkpoint policy."""
from __future__ import annotations

import logging
import os

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from charnn.config import Spec, redacted_dict
from charnn.data.dataset import Manifest
from charnn.errors import CharnnError, TrainingError, as_charnn_error
from charnn.lease import Lease
from charnn.storage import Store, join
from charnn.checkpoint import (CheckpointError, latest_checkpoint, resume_differences, resume_settings,
                              set_aside_unusable_ray_snapshot)
from charnn.train.checkpointer import RunDirectory
from charnn.train.trainer import train_loop_per_worker


GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train passes it on to its controller
RUN_LEASE_S = 60.0  # a driver that dies on another machine keeps its run from others this long at most


def run_lease(spec: Spec) -> Lease:
    """The lease of the spec's run directory, for its driver to hold while it trains the run."""
    return RunDirectory(join(spec.run.storage, spec.run.name), Store.of(spec.storage)).lease(RUN_LEASE_S)


def make_trainer(spec: Spec, dataset_url: str, init_from: str | None = None, lease: int | None = None) -> TorchTrainer:
    """A trainer for ``spec`` on ``dataset_url``; a new run starts from ``init_from``'s weights if given;
    its workers write checkpoints only while the run's newest lease is ``lease`` (when given)."""
    storage_path, storage_filesystem = Store.of(spec.storage).for_ray(spec.run.storage)
    resources = {"CPU": spec.cluster.cpus_per_worker}
    fewest, most = spec.cluster.workers_range
    return TorchTrainer(
        train_loop_per_worker,
        # Ray records this config and serves it on the dashboard: the spec with credentials masked
        # (workers never read data.sources; the keys they do read may carry none, see jobs/spec.py).
        train_loop_config={"spec": redacted_dict(spec), "dataset": dataset_url, "init_from": init_from,
                           "run_lease": lease},
        torch_config=TorchConfig(backend="nccl" if spec.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(  # elastic: a group of any size in [fewest, most] trains the same rows
            num_workers=(fewest, most) if fewest < most else most, use_gpu=spec.cluster.use_gpu,
            resources_per_worker=resources, elastic_resize_monitor_interval_s=spec.cluster.resize_interval_s,
        ),
        run_config=RunConfig(
            name=spec.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
        ),
    )


def fit(spec: Spec, dataset_url: str, init_from: str | None = None, lease: Lease | None = None) -> str:
    """Train (or resume) the spec's run, holding its ``lease`` if given; the URL of its final
    checkpoint: the run directory's newest good one, which Ray Train's result may not name when a
    worker died between saving it and the controller registering it."""
    run_url = join(spec.run.storage, spec.run.name)
    store = Store.of(spec.storage)
    set_aside_unusable_ray_snapshot(run_url, store)
    os.environ[GROUP_START_TIMEOUT] = f"{spec.cluster.start_timeout_s:g}"  # the controller reads the driver's
    try:
        result = make_trainer(spec, dataset_url, init_from, lease and lease.number).fit()
    except TrainingFailedError as exc:  # Ray 2.60 raises what earlier versions returned as result.error
        raise training_error(exc) from None
    if result.error is not None:
        raise training_error(result.error)
    final = latest_checkpoint(run_url, store)
    if final is None:
        raise TrainingError(f"{run_url} holds no good checkpoint after training; run the job again")
    return final


def check_resume(spec: Spec, saved: dict, manifest: Manifest | None = None) -> None:
    """Refuse to resume a run beyond its end, or with other training settings, or (given the
    dataset's ``manifest``) on other data; with ``run.resume=force``, say what differs and go on."""
    steps_per_epoch = manifest.splits["train"].steps if manifest else None
    total = not spec.train.minutes and (spec.train.steps or (steps_per_epoch and spec.train.epochs * steps_per_epoch))
    if total and saved["step"] > total:
        raise CheckpointError(f"run {spec.run.name} is at step {saved['step']}, past train.steps={total}; "
                              f"raise train.steps to continue it, or use a new run.name")
    differences = resume_differences(saved, manifest.stream if manifest else saved.get("stream"),
                                     resume_settings(spec))
    if differences and spec.run.resume == "check":
        raise CheckpointError(f"run {spec.run.name} was trained with other {'; '.join(differences)}; use a new "
                              f"run.name, or --set run.resume=force to resume it anyway (keeping its optimiser, "
                              f"schedule and position in the data)")
    if differences and manifest:
        logging.getLogger("charnn").warning("resuming %s despite other %s (run.resume=force)", spec.run.name,
                                            "; ".join(differences))


def training_error(error: Exception) -> CharnnError:
    """The project's own error a worker raised (a one-line user error, with its exit status), else a
    TrainingError with the first failing worker's error in one line."""
    return as_charnn_error(error, "training failed")
