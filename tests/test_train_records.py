"""A run's records read back safely (audit N-12): checkpoint checksums are computed in bounded
reads whatever a file's size, and a metrics.jsonl that a crash cut short does not block a resume."""
from __future__ import annotations

import hashlib
import json
import os

from charnn import checkpoint as ckpt
from charnn.storage import Store
from charnn.train.metrics import METRICS_FILE, RunLog, _points_until, read_points

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


class CountingStore:
    def __init__(self):
        self.filesystems: list[CountingFileSystem] = []

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
    fs, path = Store().fs(str(tmp_path / "checkpoint" / "model.pt"))
    assert ckpt.file_sha256(fs, path) == hashlib.sha256(files["model.pt"]).hexdigest()
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
    assert [p["step"] for p in points] == [1, 2, 3]
    warnings = [line for line in capfd.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 unreadable lines" in warnings[0] and METRICS_FILE in warnings[0]
    assert [p["step"] for p in read_points(Store(), str(run))["train"]] == [1, 2, 3]


def test_a_run_whose_metrics_file_was_cut_short_resumes_its_records(tmp_path):
    run = tmp_path / "run"
    write_points_cut_short(run)
    log = RunLog(str(run), Store(), 3)  # what rank 0 builds when the run resumes at step 3
    log.scalars("train", 4, {"loss": 0.5})
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
