"""The benchmark scripts' own logic: bench/quality.py reads the points a run logs, the
training clock leaves pauses out, and bench/step_profile.py accounts for a step (tiny shapes)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from charnn.storage import Store
from charnn.train import metrics
from charnn.train.metrics import Interval, MetricsLogger, RunLog, TrainClock, read_points

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
    logger.log_train(1000, 1, {"lr": 3e-3, "grad_norm": 0.4}, torch.device("cpu"))
    logger.log_val(1000, {"val_loss": 1.4871, "val_accuracy": 0.552, "val_bpc": 2.145, "train_seconds": 1650.0})
    logger.log_val(1250, {"val_loss": 1.4402, "val_accuracy": 0.566, "val_bpc": 2.078, "train_seconds": 2010.0})
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
        first.scalars("val", step, {"loss": 2.0})
    first.flush()
    again = RunLog(run_url, Store(), 20)
    again.scalars("val", 30, {"loss": 1.9})
    again.flush()
    assert [(p["step"], p["loss"]) for p in read_points(Store(), run_url)["val"]] == [(10, 2.0), (20, 2.0), (30, 1.9)]


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
    figures = interval.close(torch.device("cpu"))
    assert figures == {"loss": 1.5, "accuracy": 1.0, "tokens_per_s": 12 / 15, "seconds_per_step": 7.5}


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
