"""Driver side: a run's plan (``prepare_run``), its resume checks, and a ``TorchTrainer`` over the
spec's workers, storage and checkpoint policy whose result (``fit``) is the run's final checkpoint and
figures, as the workers' last report gave them."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from charnn.config import Spec
from charnn.spec_loader import redacted_dict
from charnn.data.dataset import Manifest
from charnn.errors import CharnnError, TrainingError, as_charnn_error
from charnn.lease import Lease
from charnn.model import ModelShape
from charnn.sample import result_sample
from charnn.storage import RunStorage, basename
from charnn.checkpoint import (CheckpointError, CheckpointMeta, check_compatible, checkpoint_names, latest_checkpoint,
                              load_checkpoint, load_meta, resume_differences, resume_settings,
                              set_aside_unusable_ray_snapshot)
from charnn.train.checkpointer import RunDirectory
from charnn.train.figures import RunFigures
from charnn.train.state import total_steps
from charnn.train.trainer import train_loop_per_worker


GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train passes it on to its controller
RUN_LEASE_S = 60.0  # a driver that dies on another machine keeps its run from others this long at most
log = logging.getLogger("charnn")


@dataclass(frozen=True)
class RunPlan:
    """What the driver knows of a run before its dataset is built, found once: where it is, the
    checkpoint it resumes (checked against the spec), its model's shape and its length."""

    spec: Spec
    storage: RunStorage
    shape: ModelShape
    checkpoints: tuple[str, ...]  # the run's checkpoint names when ``resumed`` was read
    resumed: CheckpointMeta | None  # its newest good checkpoint's record; None: a fresh run

    def total_steps(self, manifest: Manifest | None = None) -> int | None:
        return total_steps(self.spec.train, manifest and manifest.splits["train"].steps)

    def again_if_written(self) -> "RunPlan":
        """This plan, or a new one if another job wrote checkpoints since it was made (call it holding
        the run's lease: from then on no other job writes any)."""
        names = tuple(checkpoint_names(self.storage.run_url, self.storage.store))
        return self if names == self.checkpoints else prepare_run(self.spec)


@dataclass(frozen=True)
class RunResult:
    """A finished run: its final checkpoint, the figures of its last report, its groups of workers
    (``[[first step, workers], ...]``) and the sample of its final weights that the result prints."""

    checkpoint: str
    figures: RunFigures
    workers: list | None = None
    sample: str = ""

    @classmethod
    def read(cls, url: str, storage: RunStorage, sample_length: int) -> "RunResult":
        """The result as the checkpoint at ``url`` records it (its weights give the sample)."""
        model, meta = load_checkpoint(url, storage.store)
        state = meta.state
        return cls(url, state.figures, state.history.get("workers"), result_sample(model, meta.alphabet, sample_length))


def prepare_run(spec: Spec) -> RunPlan:
    """The run's plan, from its storage: a resume of another model or other settings is refused here,
    before Ray starts."""
    storage = RunStorage.from_spec(spec)
    names = tuple(checkpoint_names(storage.run_url, storage.store))
    newest = latest_checkpoint(storage.run_url, storage.store) if names else None
    plan = RunPlan(spec, storage, ModelShape.from_spec(spec, spec.data.alphabet), names,
                   load_meta(newest, storage.store) if newest else None)
    if plan.resumed:
        check_compatible(plan.resumed, plan.shape, spec.data.alphabet)
        check_resume_settings(plan)
    return plan


def run_lease(plan: RunPlan) -> Lease:
    """The lease of the run directory, for its driver to hold while it trains the run."""
    return RunDirectory(plan.storage.run_url, plan.storage.store).lease(RUN_LEASE_S)


def make_trainer(spec: Spec, dataset_url: str, init_from: str | None = None, lease: int | None = None,
                 storage: RunStorage | None = None) -> TorchTrainer:
    """A trainer for ``spec`` on ``dataset_url``; a new run starts from ``init_from``'s weights if given;
    its workers write checkpoints only while the run's newest lease is ``lease`` (when given)."""
    storage = storage or RunStorage.from_spec(spec)
    storage_path, storage_filesystem = storage.store.for_ray(storage.root)
    resources = {"CPU": spec.cluster.cpus_per_worker}
    fewest, most = spec.cluster.workers_range
    return TorchTrainer(
        train_loop_per_worker,
        # Ray records this config and serves it on the dashboard: the spec with credentials masked
        # (workers never read data.sources; the keys they do read may carry none, see jobs/spec.py).
        train_loop_config={"spec": redacted_dict(spec), "storage": storage.to_dict(),
                           "dataset": dataset_url, "init_from": init_from, "run_lease": lease},
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


def fit(plan: RunPlan, manifest: Manifest, init_from: str | None = None, lease: Lease | None = None) -> RunResult:
    """Train (or resume) the planned run on ``manifest``'s dataset, holding its ``lease`` if given."""
    storage = plan.storage
    set_aside_unusable_ray_snapshot(storage.run_url, storage.store)
    os.environ[GROUP_START_TIMEOUT] = f"{plan.spec.cluster.start_timeout_s:g}"  # the controller reads the driver's
    try:
        result = make_trainer(plan.spec, manifest.url, init_from, lease and lease.number, storage).fit()
    except TrainingFailedError as exc:  # Ray 2.60 raises what earlier versions returned as result.error
        raise training_error(exc) from None
    if result.error is not None:
        raise training_error(result.error)
    return final_result(plan, result.checkpoint and basename(result.checkpoint.path), result.metrics)


def final_result(plan: RunPlan, registered: str | None, metrics: dict | None) -> RunResult:
    """The run's result: Ray Train's (its registered checkpoint and that report's figures), unless the run
    directory holds a newer checkpoint than Ray registered (a worker died between saving it and the
    controller registering it, or Ray's record was set aside); then its newest good one, read back."""
    storage = plan.storage
    names = checkpoint_names(storage.run_url, storage.store)
    if registered and metrics and names and names[-1] == registered and "sample" in metrics:
        return RunResult(storage.checkpoint(registered), RunFigures.from_metrics(metrics), metrics.get("workers"),
                         metrics["sample"])
    final = latest_checkpoint(storage.run_url, storage.store)
    if final is None:
        raise TrainingError(f"{storage.run_url} holds no good checkpoint after training; run the job again")
    return RunResult.read(final, storage, plan.spec.train.sample_length)


def check_resume_settings(plan: RunPlan) -> None:
    """Before the dataset is built: refuse to resume the run past train.steps, or with other training
    settings (with ``run.resume=force`` it goes on, and ``check_resume_data`` says what differs)."""
    _refuse_past_end(plan, plan.total_steps())
    _refuse_differences(plan.spec, resume_differences(plan.resumed, None, resume_settings(plan.spec)))


def check_resume_data(plan: RunPlan, manifest: Manifest) -> None:
    """Once the dataset is built: refuse to resume the run past its end (its epochs are known now), or
    with other training settings or other data; with ``run.resume=force``, say what differs and go on."""
    _refuse_past_end(plan, plan.total_steps(manifest))
    differences = resume_differences(plan.resumed, manifest.stream, resume_settings(plan.spec))
    _refuse_differences(plan.spec, differences)
    if differences:
        log.warning("resuming %s despite other %s (run.resume=force)", plan.spec.run.name, "; ".join(differences))


def _refuse_past_end(plan: RunPlan, total: int | None) -> None:
    if total and plan.resumed.step > total:
        raise CheckpointError(f"run {plan.spec.run.name} is at step {plan.resumed.step}, past train.steps={total}; "
                              f"raise train.steps to continue it, or use a new run.name")


def _refuse_differences(spec: Spec, differences: list[str]) -> None:
    if differences and spec.run.resume == "check":
        raise CheckpointError(f"run {spec.run.name} was trained with other {'; '.join(differences)}; use a new "
                              f"run.name, or --set run.resume=force to resume it anyway (keeping its optimiser, "
                              f"schedule and position in the data)")


def training_error(error: Exception) -> CharnnError:
    """The project's own error a worker raised (a one-line user error, with its exit status), else a
    TrainingError with the first failing worker's error in one line."""
    return as_charnn_error(error, "training failed")
