"""Driver side: a ``TorchTrainer`` over the spec's workers, storage and checkpoint policy."""
from __future__ import annotations

import os

import pyarrow.fs
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.spec import Spec, spec_to_dict
from pipeline.reader import DatasetError
from pipeline.storage import StorageError, s3_attempts
from train import TrainingError
from train.checkpoint import CheckpointError
from train.loop import train_loop_per_worker


def storage_for_ray(url: str, storage) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for RunConfig: S3 gets a filesystem of its own, for
    the endpoint override and for patient retries."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = storage.endpoint_url if storage is not None else None
        options = {"endpoint_override": endpoint.split("://", 1)[-1], "region": "us-east-1",
                   "scheme": "https" if endpoint.startswith("https") else "http"} if endpoint else {}
        if storage is not None and storage.region:
            options["region"] = storage.region
        fs = pyarrow.fs.S3FileSystem(anonymous=bool(storage and storage.anon), **options,
                                     retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=s3_attempts(storage)))
        return url.split("://", 1)[1], fs
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url)), None
    return url, None


def make_trainer(spec: Spec, dataset_url: str, init_from: str | None = None) -> TorchTrainer:
    """A trainer for ``spec`` on ``dataset_url``; a new run starts from ``init_from``'s weights if given."""
    storage_path, storage_filesystem = storage_for_ray(spec.run.storage, spec.storage)
    resources = {"CPU": spec.cluster.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec_to_dict(spec), "dataset": dataset_url, "init_from": init_from},
        torch_config=TorchConfig(backend="nccl" if spec.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.cluster.num_workers, use_gpu=spec.cluster.use_gpu, resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=spec.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
        ),
    )


def checkpoint_url(storage_url: str, checkpoint) -> str:
    """The checkpoint's URL in the run's storage (Ray gives a filesystem-relative path)."""
    if "://" in storage_url and "://" not in checkpoint.path:
        return f"{storage_url.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def training_error(error: Exception) -> Exception:
    """The project's own error a worker raised (a one-line user error), else a TrainingError."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError wraps the worker's own exception
    if isinstance(cause, (CheckpointError, DatasetError, StorageError)):
        return cause
    text = " ".join(str(cause).split())
    return TrainingError(f"training failed: {type(cause).__name__}: {text[-500:]}")
