"""Start-up failures are one line with a bounded wait, and hold nothing that other jobs need
(audit N-7, F-5, and the ray.init failures seen under load): a Ray cluster that is not there or
does not answer, and a run that another job is training."""
from __future__ import annotations

import socket
import time
from pathlib import Path

from support.jobs import run_job, write_corpus
from support.servers import free_port

JOB_ARGS = ("--spec", "jobs/specs/smoke.yaml", "--set", "cluster.connect_timeout_s=5")


def one_error_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("charnn: ")]
    assert "Traceback" not in stderr, stderr[-3000:]
    return line


def corpus(tmp_path: Path) -> tuple[str, ...]:
    write_corpus(tmp_path / "corpus", documents=2, lines=10)
    return ("--set", f"data.sources=[{tmp_path / 'corpus'}]", "--set", f"run.storage={tmp_path / 'runs'}",
            "--set", f"data.dataset_root={tmp_path / 'datasets'}")


def test_a_retrain_whose_cluster_is_not_there_exits_75_at_once_and_never_takes_the_lease(tmp_path):
    """N-7: Ray first, then the lease; an address where nothing listens is told within
    cluster.connect_timeout_s, not after Ray's 14 minutes of retries, and keeps no other retrain out."""
    started = time.monotonic()
    proc, _ = run_job("retrain.py", *JOB_ARGS, *corpus(tmp_path), env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"},
                      check=False, timeout=120)
    assert proc.returncode == 75 and time.monotonic() - started < 60
    line = one_error_line(proc.stderr)
    assert "could not start or reach the Ray cluster at 127.0.0.1:" in line and "nothing answers" in line
    assert not (tmp_path / "runs").exists()  # no lease taken, nothing written


def test_a_cluster_that_accepts_but_never_answers_is_given_up_on_in_bounded_time(tmp_path):
    """ray.init's own waits run in C++ for many minutes (a GCS that hangs, or one overloaded): a
    watchdog ends the job with one line and status 75 once cluster.connect_timeout_s is spent."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections are accepted by the kernel, and nothing ever answers
        started = time.monotonic()
        proc, _ = run_job("train.py", *JOB_ARGS, *corpus(tmp_path),
                          env={"RAY_ADDRESS": f"127.0.0.1:{silent.getsockname()[1]}"}, check=False, timeout=120)
    assert proc.returncode == 75 and time.monotonic() - started < 60
    assert "could not start or reach the Ray cluster at 127.0.0.1:" in one_error_line(proc.stderr)


def test_a_second_job_of_a_run_that_is_training_exits_75_and_writes_nothing(tmp_path):
    """F-5: one job trains a run at a time: the driver holds the run directory's lease, taken before
    it resumes or writes anything, so two jobs never resume or write each other's checkpoints."""
    from charnn.train.checkpointer import RunDirectory

    other = RunDirectory(str(tmp_path / "runs" / "smoke")).lease(60)
    other.acquire()
    try:
        proc, _ = run_job("train.py", *JOB_ARGS, *corpus(tmp_path), check=False, timeout=120)
    finally:
        other.release()
    assert proc.returncode == 75
    line = one_error_line(proc.stderr)
    assert line.startswith("charnn: busy: another job training this run holds the lease of ") and "/runs/smoke" in line
    assert sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir()) == [".lock", "lease"]
