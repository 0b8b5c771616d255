"""The benchmark scripts' own logic: bench/quality.py reads the points a run logs, the
training clock leaves pauses out, bench/step_profile.py accounts for a step (tiny shapes) and
bench/fixed_cost.py puts each stage of a job between its marks."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from charnn.storage import Store
from charnn.train import metrics
from charnn.train.collectives import ProcessGroup
from charnn.train.figures import ValFigures
from charnn.train.metrics import Interval, MetricsLogger, Point, RunLog, TrainClock, read_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_bench_reads_the_points_a_run_logs(tmp_path, monkeypatch):
    quality = bench_module("quality")
    monkeypatch.setattr(metrics, "say", lambda line: None)
    run_url = str(tmp_path / "runs" / "r")
    clock = TrainClock(before=1612.4)
    logger = MetricsLogger(RunLog(run_url, Store(), 0), every=25, total=1800, clock=clock)
    logger.interval.add(torch.tensor(1.5234), torch.zeros(1, 1, 98), torch.zeros(1, 1, dtype=torch.long))
    logger.log_train(1000, 1, {"lr": 3e-3, "grad_norm": 0.4}, ProcessGroup())
    logger.log_val(1000, ValFigures(1.4871, 0.552), 1650.0)
    logger.log_val(1250, ValFigures(1.4402, 0.566), 2010.0)
    logger.close()
    curves = quality.curves_of(read_points(Store(), run_url), started=0.0)
    (train,) = curves["train"]
    assert (train["step"], train["epoch"], train["loss"], train["accuracy"]) == (1000, 1, pytest.approx(1.5234), 1.0)
    assert train["train_s"] == pytest.approx(1612.4, abs=1.0) and train["wall_s"] > 1e9  # a POSIX time since 0
    assert [(p["step"], p["loss"], p["train_s"]) for p in curves["val"]] == [(1000, 1.4871, 1650.0),
                                                                            (1250, 1.4402, 2010.0)]
    assert quality.time_to(curves, 1.45)["step"] == 1250
    assert quality.time_to(curves, 1.49)["step"] == 1000
    assert quality.time_to(curves, 1.40) is None
    assert (tmp_path / "runs" / "r" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_logs_each_point_once(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "say", lambda line: None)
    run_url = str(tmp_path / "r")
    first = RunLog(run_url, Store(), 0)
    for step in (10, 20, 30):  # the attempt died after step 30; its checkpoint is of step 20
        first.log(Point("val", step, loss=2.0))
    first.flush()
    again = RunLog(run_url, Store(), 20)
    again.log(Point("val", 30, loss=1.9))
    again.flush()
    assert [(p.step, p.loss) for p in read_points(Store(), run_url)["val"]] == [(10, 2.0), (20, 2.0), (30, 1.9)]


def test_quality_plot_draws_runs_side_by_side(tmp_path):
    quality = bench_module("quality")
    run = {"label": "seed", "train": [{"train_s": 60.0 * i, "loss": 2.0 - i / 10} for i in range(5)],
           "val": [{"train_s": 240.0, "loss": 1.61}]}
    png = tmp_path / "q.png"
    quality.plot([run, {**run, "label": "mine"}], str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_clock_and_the_logged_speed_leave_pauses_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    clock = TrainClock(before=50.0)  # 50 s trained before a resume
    interval = Interval(clock)
    y = torch.zeros(2, 3, dtype=torch.long)
    logits = torch.zeros(2, 3, 5)
    logits[..., 0] = 1.0  # every prediction right
    now[0] += 10
    interval.add(torch.tensor(2.0), logits, y)
    with clock.paused():  # validation and a checkpoint
        now[0] += 30
        assert clock.before == 60.0
    now[0] += 5
    interval.add(torch.tensor(1.0), logits, y)
    assert clock.seconds() == 65.0
    figures = interval.close(ProcessGroup())
    assert figures == {"loss": 1.5, "accuracy": 1.0, "tokens_per_s": 12 / 15, "seconds_per_step": 7.5}


@pytest.mark.ray  # a job in a process of its own (seconds of imports): not for `make check`
@pytest.mark.timeout(120)
def test_profile_script_accounts_for_the_step():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "step_profile.py"), "--batch", "4", "--steps", "2",
                          "--threads", "1"], capture_output=True, text=True, timeout=110, check=True).stdout
    shares = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and parts and parts[-1].endswith("%") and "ms" in parts:
            shares[" ".join(parts[:parts.index("ms") - 1])] = float(parts[parts.index("ms") + 1].rstrip("%"))
    assert set(shares) == {"forward", "backward", "clip", "optimizer"}, out
    assert shares["forward"] > 0 and shares["backward"] > 0
    assert 50 < sum(shares.values()) <= 100.5, out
    matmuls = next(line for line in out.splitlines() if "matrix products" in line)
    assert 0 < float(matmuls.split("ms, ")[1].split("%")[0]) < 100, matmuls


def test_fixed_cost_bench_puts_each_stage_between_its_marks(tmp_path):
    """bench/fixed_cost.py's table: driver marks, Ray Train's controller log and the workers' marks
    (the slowest worker's where a stage ends on every worker), without running a job."""
    fixed_cost = bench_module("fixed_cost")
    logs = tmp_path / "session" / "logs" / "train"
    logs.mkdir(parents=True)
    records = [("No checkpoint manager snapshot found.", 20.0), ("Requesting resources: {'CPU': 1} * 2", 20.5),
               ("Attempting to start training worker group of size 2", 21.0), ("Started training worker group", 30.0)]
    (logs / "ray-train-sys-controller-1.log").write_text("not JSON\n" + "".join(
        json.dumps({"message": text, "timestamp_ns": int(t * 1e9)}) + "\n" for text, t in records))
    marks = [{"stage": stage, "t": t, "pid": 1} for stage, t in (
        ("launch", 0.0), ("probe.start", 0.1), ("imports.end", 4.0), ("ray.init.start", 4.5), ("ray.init.end", 12.0),
        ("dataset.start", 13.0), ("dataset.end", 15.0), ("fit.start", 16.0), ("fit.end", 40.0), ("report.start", 40.5),
        ("report.end", 41.0), ("shutdown.start", 41.0), ("shutdown.end", 42.5), ("main.end", 42.6),
        ("atexit.first", 43.0), ("atexit.last", 43.5), ("exit", 45.0))]
    marks += [{"stage": stage, "t": t, "pid": pid} for pid, times in ((7, (29.0, 30.0, 31.0, 36.0, 36.1, 37.0)),
                                                                   (8, (29.5, 30.5, 32.0, 38.0, 38.2, 39.0)))
              for stage, t in zip(("worker.entered", "setup.make_optimizer.start", "setup.make_optimizer.end",
                                   "step.start", "step.end", "worker.done"), times)]
    table = fixed_cost.stage_table(marks + fixed_cost.controller_marks(str(tmp_path / "session")))
    assert table["imports (charnn.cli.train: ray, ray.train, torch, ...)"] == pytest.approx(3.9)
    assert table["ray.init (embedded)"] == pytest.approx(7.5)
    assert table["  of which dataset build"] == pytest.approx(2.0)
    assert table["fit() to the controller's first log line"] == pytest.approx(4.0)
    assert table["controller set-up (until it requests resources)"] == pytest.approx(0.5)
    assert table["worker group start (actors, process group)"] == pytest.approx(8.0)  # to the first worker's start
    assert table["Trainer set-up in the workers"] == pytest.approx(9.0)  # to the slowest worker's first step
    assert table["first step"] == pytest.approx(0.2)
    assert table["  Trainer set-up: make_optimizer (slowest worker)"] == pytest.approx(1.5)
    assert table["  Trainer set-up: wrap (slowest worker)"] is None  # no marks: shown as "-"
    assert table["workers done to fit() returning"] == pytest.approx(1.0)
    assert table["ray.shutdown"] == pytest.approx(1.5)
    assert table["  of which interpreter teardown"] == pytest.approx(1.5)
    assert table["launch to the first step done"] == pytest.approx(38.2)
    assert table["whole command"] == pytest.approx(45.0)
