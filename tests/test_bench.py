"""The benchmark scripts' own logic: bench/quality.py reads what the training loop prints, the
training clock leaves pauses out, and bench/step_profile.py accounts for a step (tiny shapes)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from charnn.train import loop
from charnn.train.loop import Interval, TrainClock, _log_progress, _log_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Scalars:
    def __init__(self):
        self.logged = []

    def scalars(self, split, step, values):
        self.logged.append((split, step, values))


def test_quality_bench_reads_the_lines_the_training_loop_prints(monkeypatch):
    quality = bench_module("quality")
    lines = []
    monkeypatch.setattr(loop, "say", lines.append)
    figures = {"loss": 1.5234, "accuracy": 0.561, "tokens_per_s": 2400.0, "seconds_per_step": 1.6, "lr": 3e-3,
               "grad_norm": 0.4}
    _log_progress(Scalars(), 1000, 1800, 1, figures, 1612.4)
    _log_validation(Scalars(), 1000, {"val_loss": 1.4871, "val_accuracy": 0.552, "val_bpc": 2.145,
                                      "train_seconds": 1650.0})
    _log_validation(Scalars(), 1250, {"val_loss": 1.4402, "val_accuracy": 0.566, "val_bpc": 2.078,
                                      "train_seconds": 2010.0})
    curves = {"train": [], "val": []}
    for wall, line in enumerate(lines):
        quality.parse_line(f"(RayTrainWorker pid=1) {line}", 100.0 + wall, curves)
    assert curves["train"] == [{"step": 1000, "epoch": 1, "loss": 1.5234, "accuracy": 0.561, "train_s": 1612.0,
                                "wall_s": 100.0}]
    assert [(p["step"], p["loss"], p["train_s"]) for p in curves["val"]] == [(1000, 1.4871, 1650.0),
                                                                            (1250, 1.4402, 2010.0)]
    assert quality.time_to(curves, 1.45)["step"] == 1250
    assert quality.time_to(curves, 1.49)["step"] == 1000
    assert quality.time_to(curves, 1.40) is None


def test_quality_plot_draws_runs_side_by_side(tmp_path):
    quality = bench_module("quality")
    run = {"label": "seed", "train": [{"train_s": 60.0 * i, "loss": 2.0 - i / 10} for i in range(5)],
           "val": [{"train_s": 240.0, "loss": 1.61}]}
    png = tmp_path / "q.png"
    quality.plot([run, {**run, "label": "mine"}], str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_clock_and_the_logged_speed_leave_pauses_out(monkeypatch):
    import torch

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
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
