"""A run's records read back safely (audit N-12): checkpoint checksums are computed in bounded
reads whatever a file's size, and a metrics.jsonl that a crash cut short does not block a resume."""
from __future__ import annotations

import hashlib
import dataclasses
import json
import os

import pytest

from charnn import checkpoint as ckpt
from charnn.storage import Store
from charnn.train.metrics import METRICS_FILE, Point, RunLog, _points_until, read_points

CHUNK = 4096


class CountingFile:
    """A file whose reads are recorded: the size of what each call returned."""

    def __init__(self, file, reads: list[int]):
        self.file, self.reads = file, reads

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.reads.append(len(data))
        return data

    def readinto(self, buffer) -> int:
        count = self.file.readinto(buffer)
        self.reads.append(count or 0)
        return count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


class CountingFileSystem:
    """A filesystem that records every read: each read call's size, and the files read whole."""

    def __init__(self, fs):
        self.fs, self.reads, self.whole = fs, [], []

    def cat_file(self, path, *args, **kwargs) -> bytes:
        self.whole.append(os.path.basename(path))
        return self.fs.cat_file(path, *args, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        return CountingFile(self.fs.open(path, mode, **kwargs), self.reads)

    def __getattr__(self, name):
        return getattr(self.fs, name)


class CountingStore(Store):
    """A Store whose every filesystem counts its reads (its methods all go through ``fs``)."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "filesystems", [])  # a Store is frozen

    def fs(self, url: str):
        fs, path = Store().fs(url)
        self.filesystems.append(CountingFileSystem(fs))
        return self.filesystems[-1], path


def sealed_checkpoint(directory) -> dict[str, bytes]:
    directory.mkdir()
    files = {"model.pt": os.urandom(100_000), "optimizer.pt": os.urandom(9_000), "rng-rank0000.pt": b"rng"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    ckpt.save_checksums(str(directory), 0, 1)
    return files


def test_checksums_are_checked_in_bounded_reads_never_reading_a_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "HASH_CHUNK", CHUNK, raising=False)
    files = sealed_checkpoint(tmp_path / "checkpoint")
    store = CountingStore()
    assert ckpt.checkpoint_problem(str(tmp_path / "checkpoint"), store) is None
    reads = [n for fs in store.filesystems for n in fs.reads]
    whole = [name for fs in store.filesystems for name in fs.whole]
    assert all(name.startswith("checksums-rank") for name in whole), whole  # small, and written by us
    assert reads and max(reads) <= CHUNK and sum(reads) == sum(len(data) for data in files.values())


def test_the_chunked_digest_is_the_whole_files_and_still_finds_damage(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "HASH_CHUNK", CHUNK, raising=False)
    files = sealed_checkpoint(tmp_path / "checkpoint")
    assert ckpt.file_sha256(Store(), str(tmp_path / "checkpoint" / "model.pt")) == \
        hashlib.sha256(files["model.pt"]).hexdigest()
    damaged = bytearray(files["model.pt"])
    damaged[-1] ^= 1  # the last chunk's last byte
    (tmp_path / "checkpoint" / "model.pt").write_bytes(bytes(damaged))
    assert ckpt.checkpoint_problem(str(tmp_path / "checkpoint")) == \
        "model.pt does not match its checksum (damaged or partly written)"


def write_points_cut_short(run) -> None:
    run.mkdir()
    lines = [json.dumps({"split": "train", "step": step, "loss": 4.0 - step}) for step in (1, 2, 3, 4)]
    lines.insert(2, "\0\0\0\0")  # a block the file system never wrote
    (run / METRICS_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the crash cut step 4


def test_a_metrics_file_cut_short_is_read_to_its_last_whole_line_with_one_warning(tmp_path, capfd):
    run = tmp_path / "run"
    write_points_cut_short(run)
    points = _points_until(Store(), str(run / METRICS_FILE), 3)
    assert [p.step for p in points] == [1, 2, 3]
    warnings = [line for line in capfd.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 unreadable lines" in warnings[0] and METRICS_FILE in warnings[0]
    assert [p.step for p in read_points(Store(), str(run))["train"]] == [1, 2, 3]


def test_a_run_whose_metrics_file_was_cut_short_resumes_its_records(tmp_path):
    run = tmp_path / "run"
    write_points_cut_short(run)
    log = RunLog(str(run), Store(), 3)  # what rank 0 builds when the run resumes at step 3
    log.log(Point("train", 4, loss=0.5))
    log.flush()
    log.writer.close()
    steps = [json.loads(line)["step"] for line in (run / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_attempt_names_its_checkpoints_after_the_one_it_resumed_even_at_the_same_step():
    older = ckpt.checkpoint_name(2, "ffffffff")  # named before generations: random hex only
    first = ckpt.checkpoint_name(2, ckpt.new_attempt(older))
    then = [ckpt.checkpoint_name(2, ckpt.new_attempt(first)) for _ in range(20)]  # whatever their random part
    assert first.startswith("checkpoint_000000002_0001_") and all(n.startswith("checkpoint_000000002_0002_") for n in then)
    order = sorted([*then, first, older, "checkpoint_2024-01-01_00-00-00.000000"], key=ckpt.checkpoint_step_order)
    assert order[:3] == ["checkpoint_2024-01-01_00-00-00.000000", older, first]
    assert ckpt.checkpoint_step_order(ckpt.checkpoint_name(3, "00000000")) > ckpt.checkpoint_step_order(then[0])
    assert ckpt.new_attempt(None).startswith("0001_")


# The model.pt record (CheckpointMeta) and the figures (issue 25)

# A step-3 model.pt as the code before CheckpointMeta wrote it (a 3-step run of a 4-cell model; its
# spec text cut to its first lines): the keys and values it held, less the weights.
OLD_PAYLOAD = {
    "format": "charnn.checkpoint/1",
    "shape": {"vocab": 98, "cell_size": 4, "layers": 1, "embedding": 0},
    "alphabet": "gorner98",
    "spec": "data:\n  sources:\n  - /tmp/w/c/old/corpus\n  alphabet: gorner98\n  seq_len: 16\n",
    "stream": "978e9f3d9d89740a",
    "settings": {"model.dropout": 0.0, "train.lr": 0.01, "train.warmup_steps": 0, "train.schedule": "constant",
                 "train.min_lr_ratio": 0.1, "train.grad_clip": 0.0, "train.epoch_state": "roll", "train.seed": 0,
                 "train.first_step": 0},
    "dataset": {"url": "/tmp/w/c/old/datasets/3036f4452caa3ef0/versions/v000001", "documents": 4},
    "step": 3,
    "epoch": 0,
    "metrics": {"step": 3, "epoch": 0, "first_loss": 4.676037311553955, "train_seconds": 0.29498238399537513,
                "train_loss": 4.6014018058776855, "train_accuracy": 0.0, "train_tokens_per_s": 9738.470345668331,
                "train_seconds_per_step": 0.0032859369966899976, "train_lr": 0.01,
                "train_grad_norm": 0.3322901725769043, "tokens_per_s": 1213.1616667526864,
                "val_loss": 4.582094873700823, "val_accuracy": 0.03125, "val_bpc": 6.610565551170919},
    "history": {"train": [[1, 4.676037311553955], [2, 4.635955333709717], [3, 4.6014018058776855]],
                "val": [[3, 4.582094873700823]], "workers": [[0, 1]]},
    "interval": {"loss": 0.0, "correct": 0.0, "count": 0, "steps": 0, "seconds": 0.0006774110006517731},
    "attempt": "0001_c74a5d68",
}


def old_payload(**changes) -> dict:
    from charnn.model import CharGRU, ModelShape

    weights = CharGRU(ModelShape(98, 4, 1)).state_dict()
    payload = {"format": OLD_PAYLOAD["format"], "model": weights, **OLD_PAYLOAD} | changes
    return {key: value for key, value in payload.items() if value is not None}


def test_an_old_model_pt_reads_as_a_record_and_is_written_back_key_for_key(tmp_path):
    from charnn.model import ModelShape

    payload = old_payload()
    meta = ckpt.CheckpointMeta.from_payload(payload, "old")
    assert (meta.shape, meta.alphabet, meta.stream, meta.attempt) == (ModelShape(98, 4, 1), "gorner98",
                                                                      "978e9f3d9d89740a", "0001_c74a5d68")
    assert meta.dataset == ckpt.DatasetRef(OLD_PAYLOAD["dataset"]["url"], 4) and meta.version == 1
    state, metrics = meta.state, OLD_PAYLOAD["metrics"]
    assert (state.step, state.train_seconds, state.first_loss) == (3, metrics["train_seconds"], metrics["first_loss"])
    assert state.train.loss == metrics["train_loss"] and state.train.tokens_per_s == metrics["train_tokens_per_s"]
    assert state.val.bpc == metrics["val_bpc"] and state.tokens_per_s == metrics["tokens_per_s"]
    assert state.interval.seconds == OLD_PAYLOAD["interval"]["seconds"]
    again = meta.to_payload(payload["model"])
    assert list(again) == list(payload) and again == payload  # the same keys, in the same order, and values
    assert list(again["metrics"]) == list(metrics)
    ckpt.save_model_files(str(tmp_path), _Model(payload["model"]), _Stateful(), _Stateful(), meta)
    read, weights = ckpt.load_model_file(str(tmp_path))
    assert read == meta and weights.keys() == payload["model"].keys()


class _Stateful:
    def state_dict(self) -> dict:
        return {}


class _Model:
    def __init__(self, weights):
        self.weights = weights

    def state_dict(self) -> dict:
        return self.weights


def test_older_and_bare_model_pts_still_load():
    older = old_payload(interval=None, stream=None, settings=None, attempt=None, epoch=None,
                        metrics={k: v for k, v in OLD_PAYLOAD["metrics"].items() if k not in ("step", "epoch")})
    meta = ckpt.CheckpointMeta.from_payload(older, "older")
    assert meta.state.interval is None and meta.state.figures.step == 3 and meta.state.epoch == 0
    assert ckpt.resume_differences(meta, "another stream", {"train.lr": 1.0}) == []  # not recorded: taken as it is
    bare = ckpt.CheckpointMeta.from_payload({k: v for k, v in old_payload().items()
                                             if k in ("format", "model", "shape", "alphabet")}, "bare")
    assert bare.state is None and bare.step == 0 and bare.dataset is None
    new = ckpt.CheckpointMeta.from_payload(old_payload(), "new")
    assert ckpt.resume_differences(new, "another stream", {"train.lr": 1.0}) == [
        "the data (its documents, their splits, data.seq_len or the rows R)", "train.lr (0.01 now 1.0)"]
    assert ckpt.resume_differences(new, None, {"train.lr": 0.01}) == []  # the data not known yet


def test_the_progress_line_the_points_the_report_and_the_result_say_the_same_figures(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from charnn.cli import train as cli_train
    from charnn.train import metrics as metrics_module
    from charnn.train.collectives import ProcessGroup
    from charnn.train.figures import RunFigures, ValFigures
    from charnn.train.launch import RunResult
    from charnn.train.metrics import MetricsLogger, TrainClock

    lines = []
    monkeypatch.setattr(metrics_module, "say", lines.append)
    run_url = str(tmp_path / "r")
    logger = MetricsLogger(RunLog(run_url, Store(), 0), every=1, total=10, clock=TrainClock(before=3.0))
    logger.interval.add(torch.tensor(1.5234), torch.zeros(2, 3, 98), torch.zeros(2, 3, dtype=torch.long))
    train = logger.log_train(4, 0, {"lr": 3e-3, "grad_norm": 0.4}, ProcessGroup())
    val = ValFigures(1.4871, 0.552)
    figures = RunFigures(4, 0, 4.6, 3.5, train, 1000.0, val)
    logger.log_val(4, val, figures.train_seconds)
    logger.flush()
    report = figures.to_metrics()
    assert RunFigures.from_metrics(report) == figures
    points = read_points(Store(), run_url)
    (point,), (val_point,) = points["train"], points["val"]
    assert point.loss == report["train_loss"] and point.tokens_per_s == report["train_tokens_per_s"]
    assert point.bpc == train.bpc and val_point.bpc == report["val_bpc"] == val.bpc
    assert f"loss {report['train_loss']:.4f} " in lines[0] and f"{report['train_tokens_per_s']:,.0f} tok/s" in lines[0]
    assert f"val_bpc {report['val_bpc']:.3f} " in lines[1]
    plan = SimpleNamespace(spec=SimpleNamespace(run=SimpleNamespace(name="r")),
                           storage=SimpleNamespace(run_url=run_url))
    result = cli_train._report(plan, SimpleNamespace(url="/d"), RunResult("/c", RunFigures.from_metrics(report),
                                                                           [[0, 1]], "text"))
    assert (result["train_loss"], result["val_loss"], result["tokens_per_s"], result["steps"]) == \
        (report["train_loss"], report["val_loss"], report["tokens_per_s"], 4)


def saved_run(run, steps) -> None:
    """Checkpoints of ``steps`` in the run directory ``run``, as a run saves them (a 4-cell model)."""
    import dataclasses

    import torch

    from charnn.model import CharGRU, ModelShape
    from charnn.train.state import TrainState

    model = CharGRU(ModelShape(98, 4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    meta = ckpt.CheckpointMeta.from_payload(old_payload(), "old")
    for step in steps:
        directory = run / ckpt.checkpoint_name(step, "0001_aa")
        directory.mkdir(parents=True)
        state = dataclasses.replace(TrainState.from_payload(OLD_PAYLOAD), step=step)
        ckpt.save_model_files(str(directory), model, optimizer, scheduler, dataclasses.replace(meta, state=state))
        ckpt.save_checksums(str(directory), 0, 1)


def test_the_result_is_ray_s_report_unless_the_run_directory_holds_a_newer_checkpoint(tmp_path, monkeypatch):
    """The driver takes the final figures from Ray Train's result, reading nothing back; only when the
    checkpoint Ray registered is not the run's newest (a worker died between saving and registering)
    does it read the newest good one."""
    from types import SimpleNamespace

    from charnn.storage import RunStorage
    from charnn.train import launch

    saved_run(tmp_path / "runs" / "r", (2, 3))
    names = ckpt.checkpoint_names(str(tmp_path / "runs" / "r"))
    plan = SimpleNamespace(storage=RunStorage(Store(), str(tmp_path / "runs"), "r", str(tmp_path / "datasets")),
                           spec=SimpleNamespace(train=SimpleNamespace(sample_length=30)))
    report = {**OLD_PAYLOAD["metrics"], "workers": [[0, 2]], "sample": "As Ray had it"}
    read = launch.load_checkpoint
    monkeypatch.setattr(launch, "load_checkpoint", lambda *a: pytest.fail("the checkpoint was read back"))
    result = launch.final_result(plan, names[-1], report)
    assert result.checkpoint == str(tmp_path / "runs" / "r" / names[-1])
    assert (result.figures.val.loss, result.workers, result.sample) == (report["val_loss"], [[0, 2]], "As Ray had it")
    monkeypatch.setattr(launch, "load_checkpoint", read)
    for registered in (names[0], None):  # behind the run directory; none (Ray's record set aside)
        behind = launch.final_result(plan, registered, registered and {**report, "step": 2})
        assert behind.checkpoint == result.checkpoint and behind.figures.step == 3 and behind.workers == [[0, 1]]
        assert behind.figures.val == result.figures.val and len(behind.sample) == 30


# Lines as RunLog wrote them before points were records: {"split", "step", **figures, "time"}.
TRAIN_LINE = ('{"split": "train", "step": 4, "loss": 1.5, "accuracy": 0.25, "bpc": 2.1640425613334453, "lr": 0.003, '
              '"tokens_per_s": 1000.0, "grad_norm": 0.4, "epoch": 0, "train_seconds": 3.5, "workers": 2, '
              '"time": 1700000000.5}')
VAL_LINE = ('{"split": "val", "step": 4, "loss": 1.5, "accuracy": 0.25, "bpc": 2.1640425613334453, '
            '"train_seconds": 3.5, "time": 1700000000.5}')


def test_a_metrics_point_reads_and_writes_the_lines_written_before_it():
    from charnn.train.figures import TrainFigures, ValFigures

    train = Point.of_train(4, TrainFigures(1.5, 0.25, 1000.0, 0.01, 0.003, 0.4), 0, 3.5, 2)
    val = Point.of_val(4, ValFigures(1.5, 0.25), 3.5)
    for point, line in ((train, TRAIN_LINE), (val, VAL_LINE)):
        point = dataclasses.replace(point, time=1700000000.5)
        assert json.dumps(point.to_dict()) == line and Point.from_dict(json.loads(line)) == point
    assert train.scalars() == {"loss": 1.5, "accuracy": 0.25, "bpc": train.bpc, "lr": 0.003, "tokens_per_s": 1000.0,
                               "grad_norm": 0.4, "epoch": 0, "train_seconds": 3.5, "workers": 2}
    older = {"split": "val", "step": 2, "loss": 2.0, "perplexity": 7.4}  # keys it lacks, and one it does not know
    assert Point.from_dict(older).to_dict() == older and Point.from_dict(older).accuracy is None
    assert Point.from_dict({"split": "test", "step": 1}) is None and Point.from_dict([1]) is None
