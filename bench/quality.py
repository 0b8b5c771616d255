"""Time to quality: train a spec end to end and print the time it took to reach each validation loss.

    .venv/bin/python bench/quality.py                                   # the quality recipe, about 50 min on 2 cores
    .venv/bin/python bench/quality.py --label seed --spec jobs/specs/shakespeare.yaml \\
        --set cluster.num_workers=2 --set train.batch_per_worker=100 --set train.steps=800
    .venv/bin/python bench/quality.py --plot bench/results/quality-seed.json bench/results/quality-quality.json

A run is ``jobs/train.py`` in a subprocess (embedded Ray, loopback only), under a fresh run name,
so nothing resumes.  Its progress and validation lines carry the training clock (seconds in
training steps, validation and checkpoints excluded), which the thresholds are timed
against; wall time since launch, start-up included, is printed beside it.  The curves go to
``bench/results/quality-<label>.json``; ``--plot`` draws runs side by side as one PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
THRESHOLDS = (1.60, 1.50, 1.45, 1.40, 1.35)
LOOPBACK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
            "AWS_EC2_METADATA_DISABLED": "true", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

TRAIN_LINE = re.compile(r"charnn: step (\d+)/\d+ epoch (\d+) loss ([\d.]+) acc ([\d.]+) .* train (\d+)s")
VAL_LINE = re.compile(r"charnn: step (\d+) val_loss ([\d.]+) val_acc ([\d.]+) .* train (\d+)s")


def parse_line(line: str, wall: float, curves: dict) -> None:
    """Add a progress or validation line's figures to ``curves``."""
    if m := TRAIN_LINE.search(line):
        step, epoch, loss, acc, seconds = m.groups()
        curves["train"].append({"step": int(step), "epoch": int(epoch), "loss": float(loss), "accuracy": float(acc),
                                "train_s": float(seconds), "wall_s": wall})
    elif m := VAL_LINE.search(line):
        step, loss, acc, seconds = m.groups()
        curves["val"].append({"step": int(step), "loss": float(loss), "accuracy": float(acc),
                              "train_s": float(seconds), "wall_s": wall})


def time_to(curves: dict, threshold: float) -> dict | None:
    """The first validation point at or below ``threshold``."""
    return next((point for point in curves["val"] if point["loss"] <= threshold), None)


def run(spec: str, overrides: list[str], label: str) -> dict:
    name = f"quality-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "--spec", spec, "--set", f"run.name={name}"]
    for override in overrides:
        command += ["--set", override]
    curves = {"label": label, "spec": spec, "overrides": overrides, "run": name, "train": [], "val": []}
    start = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **LOOPBACK, "RAY_DEDUP_LOGS": "0"}) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            parse_line(line, time.monotonic() - start, curves)
    if process.returncode:
        sys.exit(f"bench/quality.py: {' '.join(command)} exited {process.returncode}")
    curves["wall_s"] = time.monotonic() - start
    return curves


def report(curves: dict) -> None:
    print(f"\n{curves['label']}: {curves['spec']} {' '.join(curves['overrides'])}")
    print(f"{'val loss':>9} {'train time':>11} {'wall time':>10} {'step':>6} {'epoch':>6}")
    epochs = {p["step"]: p["epoch"] for p in curves["train"]}
    for threshold in THRESHOLDS:
        point = time_to(curves, threshold)
        if point is None:
            print(f"{threshold:>9.2f} {'not reached':>11}")
        else:
            print(f"{threshold:>9.2f} {point['train_s'] / 60:>9.1f} m {point['wall_s'] / 60:>8.1f} m "
                  f"{point['step']:>6} {epochs.get(point['step'], '?'):>6}")
    if curves["val"]:
        best = min(curves["val"], key=lambda p: p["loss"])
        print(f"best val loss {best['loss']:.4f} (accuracy {best['accuracy']:.3f}) at step {best['step']}, "
              f"{best['train_s'] / 60:.1f} min of training; whole run {curves.get('wall_s', 0) / 60:.1f} min")


def plot(runs: list[dict], path: str) -> None:
    """One panel per run, side by side, loss against minutes of training, the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), dpi=100, sharey=True, sharex=True)
    for axis, curves in zip([axes] if len(runs) == 1 else axes, runs):
        for split, style in (("train", "-"), ("val", "o-")):
            points = curves[split]
            axis.plot([p["train_s"] / 60 for p in points], [p["loss"] for p in points], style, markersize=4,
                      label=f"{split} loss")
        axis.axhline(1.45, color="grey", linestyle=":", label="1.45 target")
        best = min((p["loss"] for p in curves["val"]), default=float("nan"))
        axis.set(title=f"{curves['label']}: best val {best:.3f}", xlabel="minutes of training (2 CPU cores)")
        axis.set_ylim(1.2, 2.6)
        axis.grid(alpha=0.3)
        axis.legend()
    (axes if len(runs) == 1 else axes[0]).set_ylabel("cross-entropy (nats/char)")
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=os.path.join(ROOT, "jobs", "specs", "shakespeare-quality.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--label", default="quality")
    parser.add_argument("--plot", nargs="+", metavar="JSON", help="draw these runs' curves instead of training")
    parser.add_argument("--png", default=os.path.join(RESULTS, "quality.png"))
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if args.plot:
        runs = []
        for path in args.plot:
            with open(path) as f:
                runs.append(json.load(f))
        for curves in runs:
            report(curves)
        plot(runs, args.png)
        return
    curves = run(args.spec, args.overrides, args.label)
    with open(os.path.join(RESULTS, f"quality-{args.label}.json"), "w") as f:
        json.dump(curves, f, indent=1)
    report(curves)


if __name__ == "__main__":
    main()
