"""Job spec schema: the typed sections of a spec, each field with its meaning and its role.

A spec holds sections (data, model, train, cluster, run, retrain, storage, serve) of plain keys;
charnn.spec_loader reads them from YAML.  A field's docstring is its documentation
(`--help-spec` prints it); its role, ``json_schema_extra={"affects": ...}``, says what else
depends on it (see ROLES), so that the dataset's name and the resume check follow the schema
instead of lists kept elsewhere.
"""
from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from charnn.data.alphabet import ALPHABETS
from charnn.redact import redact


ROLES = {
    "dataset": "names the dataset directory: another value builds (or finds) another dataset",
    "resume": "a run resumes only with the value its checkpoints recorded (unless run.resume: force)",
    "workers": "a location Ray's workers are given as written (Ray records it): it may carry no credentials",
}


def affects(role: str) -> dict[str, str]:
    """A field's role, for ``Field(json_schema_extra=...)``: one of ROLES."""
    assert role in ROLES, role
    return {"affects": role}


# The sections are pydantic dataclasses: real dataclasses (fields, replace, asdict, ==), validated
# by pydantic when built.  Strict on purpose: YAML's `yes`/`1.0` should not silently become a bool
# or an int (an int is a float, though).  Strict per field: a strict dataclass refuses a dict.
# Defaults are not validated: data.sources has no valid one, charnn.spec_loader checks it.
# A field's docstring is its description (use_attribute_docstrings).
_SECTION = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def _rule(need: str, ok: Callable[[Any], bool]) -> AfterValidator:
    """A constraint with no pydantic keyword; `need` completes "<key> must ..."."""
    def check(v: Any) -> Any:
        if not ok(v):
            raise PydanticCustomError("spec_rule", "must {need}", {"need": need, "got": v})
        return v
    return AfterValidator(check)


def _no_credentials(v: Optional[str]) -> bool:

    return v is None or redact(v) == v


# Ray records what its workers receive (train_loop_config): these values reach the workers.  The
# "workers" role and the rule travel together in one type.
_NoCredentials = _rule("not carry credentials (Ray's workers receive this value; give credentials through the "
                       "environment, see README \"Security\")", _no_credentials)
_WorkersRole = Field(json_schema_extra=affects("workers"))
_WorkerLocation = Annotated[StrictStr, _NoCredentials, _WorkersRole]
_OptionalWorkerLocation = Annotated[Optional[StrictStr], _NoCredentials, _WorkersRole]
# URLs, dirs, globs or "corpus:NAME"; a blank one (an unset shell variable) would list the cwd.
_Sources = Annotated[list[StrictStr], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                     Field(min_length=1), _rule("have no blank entries", lambda v: all(s.strip() for s in v))]
# Names become storage path segments: ".", ".." and hidden names would point elsewhere.
_Name = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._-]+$"),
                  _rule("not start with '.'", lambda v: not v.startswith("."))]


@dataclass(config=_SECTION)
class DataConfig:
    """The text and the dataset built from it (charnn.data)."""

    sources: _Sources = Field(default_factory=list)
    """The text (required): URLs, directories, globs or corpus:NAME, one or a list.  The dataset is not named by
    them: a corpus that grows adds versions to the same dataset.  The only key that may carry
    credentials (the workers never read it)."""
    alphabet: Literal[ALPHABETS] = Field("gorner98", json_schema_extra=affects("dataset"))
    """Text to codes: gorner98 (98 codes, one for every unknown character) or bytes (lossless, 256)."""
    seq_len: StrictInt = Field(30, gt=0, json_schema_extra=affects("dataset"))
    """T: the characters of each row that one step reads (the unroll length)."""
    dataset_root: _WorkerLocation = "~/.cache/charnn/datasets"
    """Root URL or path of the datasets: each is a directory named by its dataset settings."""
    val_fraction: StrictFloat = Field(0.1, gt=0, lt=1, json_schema_extra=affects("dataset"))
    """The share of the documents held out for validation (a document's split follows from its key)."""
    shard_mb: StrictInt = Field(64, gt=0, json_schema_extra=affects("dataset"))
    """The size of a row shard file, in MiB, about."""
    max_concurrency: Optional[StrictInt] = Field(None, gt=0)
    """Ray Data tasks at once; null: the free CPUs."""
    in_process_mb: StrictInt = Field(64, ge=0)
    """A pipeline stage whose input is under this many MiB runs in the job's own process, not as Ray Data
    tasks (they take seconds to start); 0: always Ray Data tasks.  The dataset is the same either way."""


@dataclass(config=_SECTION)
class ModelConfig:
    """The character-level GRU (charnn.model)."""

    cell_size: StrictInt = Field(512, gt=0)
    """Hidden units of each GRU layer."""
    layers: StrictInt = Field(3, gt=0)
    """Stacked GRU layers."""
    dropout: StrictFloat = Field(0.2, ge=0, lt=1, json_schema_extra=affects("resume"))
    """Dropout probability while training."""
    embedding: StrictInt = Field(0, ge=0)
    """Width of the input embedding; 0 means one-hot input."""


@dataclass(config=_SECTION)
class TrainConfig:
    """The training loop, its schedule and its cadences (charnn.train)."""

    batch_per_worker: StrictInt = Field(200, gt=0, json_schema_extra=affects("dataset"))
    """Rows each worker trains per step: a step is R = cluster.num_workers x this rows, and the
    dataset is laid out for R."""
    steps: StrictInt = Field(0, ge=0)
    """Steps to train; 0 means use train.epochs."""
    epochs: StrictInt = Field(10, gt=0)
    """Passes over the train split, when train.steps is 0 and train.minutes is 0."""
    lr: StrictFloat = Field(0.001, gt=0, json_schema_extra=affects("resume"))
    """Adam's learning rate, before warmup and decay."""
    seed: StrictInt = Field(0, json_schema_extra=affects("resume"))
    """Seeds the initial weights and the dropout."""
    warmup_steps: StrictInt = Field(0, ge=0, json_schema_extra=affects("resume"))
    """Steps of linear warmup to train.lr."""
    schedule: Literal["constant", "cosine", "step"] = Field("constant", json_schema_extra=affects("resume"))
    """The learning rate after warmup: constant, cosine (down to train.min_lr_ratio) or step (x0.1 at
    2/3 and again at 8/9 of the way)."""
    min_lr_ratio: StrictFloat = Field(0.1, ge=0, le=1, json_schema_extra=affects("resume"))
    """Where the cosine schedule ends, as a share of train.lr."""
    grad_clip: StrictFloat = Field(0.0, ge=0, json_schema_extra=affects("resume"))
    """The most the gradients' global norm may be; 0 means off."""
    epoch_state: Literal["roll", "reset"] = Field("roll", json_schema_extra=affects("resume"))
    """At an epoch's start, roll: the state that ended a row starts the next row; reset: every row
    starts from zero."""
    log_every: StrictInt = Field(50, gt=0)
    """Steps between progress lines (and metrics records)."""
    validate_every: StrictInt = Field(0, ge=0)
    """Steps between validations; 0 means only at the end."""
    checkpoint_every: StrictInt = Field(500, ge=0)
    """Steps between checkpoints; 0 means only at the end."""
    sample_every: StrictInt = Field(0, ge=0)
    """Steps between text samples in the log; 0 means none."""
    sample_length: StrictInt = Field(200, gt=0)
    """Characters of each sample."""
    num_to_keep: StrictInt = Field(3, gt=0)
    """Checkpoints kept in the run directory, the newest ones."""
    minutes: StrictFloat = Field(0.0, ge=0)
    """> 0: train this long (the training clock) instead of train.steps."""
    first_step: StrictInt = Field(0, ge=0, json_schema_extra=affects("resume"))
    """The train split's step a run reads first; it reads on to the split's end, then round from step
    0 (the next epoch).  A retrain's candidate starts at the dataset's new segments (charnn.cli.retrain)."""


@dataclass(config=_SECTION)
class ClusterConfig:
    """The workers of a run and how long Ray may take to provide them."""

    num_workers: StrictInt = Field(1, gt=0, json_schema_extra=affects("dataset"))
    """W, the training workers; with train.batch_per_worker it makes the rows R of a step."""
    use_gpu: StrictBool = False
    """A GPU per worker (NCCL), else CPUs (gloo)."""
    cpus_per_worker: StrictInt = Field(1, gt=0)
    """CPUs Ray reserves for each worker."""
    max_failures: StrictInt = Field(0, ge=0)
    """Worker group failures a run recovers from (from its latest checkpoint) before it fails."""
    resource_timeout_s: StrictInt = Field(600, ge=0)
    """How long a remote (autoscaling) cluster may take to offer the workers."""
    connect_timeout_s: StrictInt = Field(120, gt=0)
    """How long starting an embedded Ray or reaching RAY_ADDRESS's cluster may take; then exit 75."""
    min_workers: Optional[StrictInt] = Field(None, gt=0)
    """Elastic training: the fewest workers a run goes on with (null: num_workers, not elastic).  A
    lost node shrinks the group to what is left (at least this many; a lost worker is a failure, so
    cluster.max_failures must allow it), and the group grows back to num_workers when capacity
    returns; either way from the latest checkpoint, with the same R rows split over the workers."""
    resize_interval_s: StrictFloat = Field(60.0, ge=0)
    """How often a running group checks whether it can grow (Ray's elastic_resize_monitor_interval_s;
    Ray Train sees a node that joined up to 20 s later)."""
    start_timeout_s: StrictFloat = Field(60.0, gt=0)
    """How long Ray Train waits for a worker group to start (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S).
    An elastic group that lost a node first asks for the lost node's workers too (Ray Train sees it
    gone up to 20 s late) and waits this long before it shrinks."""

    @property
    def workers_range(self) -> tuple[int, int]:
        """(fewest, most) workers of the run."""
        return (self.min_workers or self.num_workers, self.num_workers)


@dataclass(config=_SECTION)
class RunConfig:
    """Which run: its name and where runs, checkpoints and models are stored."""

    name: _Name = "charnn"
    """The run's directory under run.storage: a run of the same name resumes."""
    storage: _WorkerLocation = "~/charnn/runs"
    """Root URL or path for runs, checkpoints, models."""
    resume: Literal["check", "force"] = "check"
    """A run resumes only on the same data and training settings ("check"); "force" resumes anyway,
    keeping the checkpoint's optimiser, schedule and position in the data."""


@dataclass(config=_SECTION)
class RetrainConfig:
    """charnn-retrain: fine-tune the published model on new text, publish it if it is better."""

    model: _Name = "charnn"
    """Registry name: <run.storage>/models/<model>/."""
    steps: StrictInt = Field(500, gt=0)
    """Fine-tuning steps from the published model."""
    min_improvement: StrictFloat = Field(0.0, ge=0)
    """Nats/char the candidate must gain on validation."""
    lease_minutes: StrictFloat = Field(30.0, gt=0)
    """A writer that dies blocks others this long at most."""
    replay: StrictFloat = Field(0.25, ge=0, lt=1)
    """The share of the fine-tune's steps that reads older text after the new segments (replay)."""
    keep_versions: StrictInt = Field(3, gt=0)
    """Published model versions kept by charnn-gc, the published one among them."""
    keep_rounds: StrictInt = Field(3, gt=0)
    """Candidate runs and rejected records of this many rounds kept."""


@dataclass(config=_SECTION)
class StorageConfig:
    """How remote storage (S3, GCS) is reached; credentials come from the environment (README "Security")."""

    endpoint_url: _OptionalWorkerLocation = None
    """S3-compatible endpoint override (MinIO, moto)."""
    region: Optional[StrictStr] = None
    """The S3 region; null: the environment's."""
    anon: StrictBool = False
    """Anonymous access, for public buckets."""
    max_attempts: StrictInt = Field(10, gt=0)
    """Attempts per S3 request; standard retry mode backs off exponentially up to 20 s."""
    shared_path: StrictBool = False
    """Local paths in run.storage, data.dataset_root and data.sources are on storage that every node
    of the cluster mounts (NFS, a shared volume): without it they are refused on a multi-node cluster."""


@dataclass(config=_SECTION)
class ServeConfig:
    """The Ray Serve application of a published model (charnn.serve, jobs/serve.py)."""

    poll_s: StrictFloat = Field(10.0, gt=0)
    """How often a replica looks for a newly published version."""
    max_length: StrictInt = Field(2000, gt=0)
    """The most characters one request may ask for."""
    replicas: StrictInt = Field(1, gt=0)
    """Ray Serve replicas of the model."""
    max_batch: StrictInt = Field(64, gt=0)
    """Streams a replica samples in one forward at most."""


@dataclass(config=_SECTION)
class Spec:
    """A job spec: one section of each kind."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def spec_fields() -> Iterator[tuple[str, FieldInfo]]:
    """Every field of the schema as (dotted key, pydantic's FieldInfo), in the schema's order."""
    for section, cls in typing.get_type_hints(Spec).items():
        for name, info in cls.__pydantic_fields__.items():
            yield f"{section}.{name}", info


def role_of(info: FieldInfo) -> Optional[str]:
    extra = info.json_schema_extra
    return extra.get("affects") if isinstance(extra, dict) else None


@functools.cache
def fields_with_role(role: str) -> tuple[str, ...]:
    """The dotted keys whose role is ``role``, in the schema's order."""
    assert role in ROLES, role
    return tuple(dotted for dotted, info in spec_fields() if role_of(info) == role)


def role_settings(spec: Spec, role: str) -> dict[str, Any]:
    """{dotted key: the spec's value} of the fields whose role is ``role``, in the schema's order."""
    return {dotted: getattr(getattr(spec, dotted.split(".")[0]), dotted.split(".")[1])
            for dotted in fields_with_role(role)}
