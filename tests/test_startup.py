"""Start-up failures are one line with a bounded wait, and hold nothing that other jobs need
(audit N-7, F-5, and the ray.init failures seen under load): a Ray cluster that is not there or
does not answer, and a run that another job is training.  And what start-up and exit cost on an
embedded Ray (issue 25, item 7; bench/fixed_cost.py measures it)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.env import REPO
from support.jobs import run_job, write_corpus
from support.servers import free_port

pytestmark = pytest.mark.ray  # jobs that start, or try to reach, a Ray
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
    from charnn.storage import Store
    from charnn.train.checkpointer import RunDirectory

    other = RunDirectory(str(tmp_path / "runs" / "smoke"), Store()).lease(60)
    other.acquire()
    try:
        proc, _ = run_job("train.py", *JOB_ARGS, *corpus(tmp_path), check=False, timeout=120)
    finally:
        other.release()
    assert proc.returncode == 75
    line = one_error_line(proc.stderr)
    assert line.startswith("charnn: busy: another job training this run holds the lease of ") and "/runs/smoke" in line
    assert sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir()) == [".lock", "lease"]


def test_an_embedded_rays_workers_are_told_their_cluster_and_skip_what_a_local_run_never_needs(tmp_path):
    """An embedded Ray's workers, and so Ray Train's controller and workers, are told the state API
    of their own cluster (not of the newest cluster on the machine), no preemption watcher (no spot
    nodes here) and a 0.5 s poll of the workers (a short run would wait up to 2 s after its last
    step); a variable set beforehand keeps its value, and the driver's own environment is left as
    it was."""
    import tempfile

    names = ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    with tempfile.TemporaryDirectory(prefix="charnn-ray-") as temp_dir:  # Ray's socket paths must be short
        code = (
            "import functools, json, os, ray\n"
            f"ray.init = functools.partial(ray.init, num_cpus=1, _temp_dir={temp_dir!r})\n"
            "from charnn.cli.runtime import init_ray\n"
            "assert init_ray() is True\n"
            f"names = {names!r}\n"
            "worker = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in names}).remote())\n"
            "print(json.dumps({'worker': worker, 'driver': {k: os.environ.get(k) for k in names},\n"
            "                  'dashboard': ray._private.worker.get_dashboard_url()}))\n"
            "ray.shutdown()\n")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *names)}
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["worker"] == {"RAY_API_SERVER_ADDRESS": f"http://{seen['dashboard']}",
                              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    assert seen["driver"] == {"RAY_API_SERVER_ADDRESS": None, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": None,
                              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def test_a_finished_command_leaves_its_objects_out_of_the_collections_at_exit():
    """Python's collections at exit walk every object of torch, Ray and pandas (seconds on a loaded
    core): a command that is done, with its result or with its one-line error, freezes them first."""
    code = ("import gc, sys\n"
            "from charnn.cli.runtime import execute\n"
            "from charnn.errors import UserError\n"
            "def fail():\n"
            "    raise UserError('no')\n"
            "try:\n"
            "    execute(fail if sys.argv[1] == 'error' else lambda: {'ok': 1})\n"
            "finally:\n"
            "    print(gc.get_freeze_count() > 0, file=sys.stderr)\n")
    for how, status in (("result", 0), ("error", 2)):
        proc = subprocess.run([sys.executable, "-c", code, how], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == status and proc.stderr.splitlines()[-1] == "True", proc.stderr[-3000:]
