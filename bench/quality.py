"""Time to quality: train a spec end to end and print the time it took to reach each validation loss.

    .venv/bin/python bench/quality.py                                   # the quality recipe, about 50 min on 2 cores
    .venv/bin/python bench/quality.py --label seed --spec jobs/specs/shakespeare.yaml \\
        --set cluster.num_workers=2 --set train.batch_per_worker=100 --set train.steps=800
    .venv/bin/python bench/quality.py --plot bench/results/quality-seed.json bench/results/quality-quality.json

A run is ``jobs/train.py`` in a subprocess (embedded Ray, loopback only), under a fresh run name,
so nothing resumes.  The curves come from the ``metrics.jsonl`` the run writes, whose points
carry the training clock (seconds in training steps, validation and checkpoints excluded),
which the thresholds are timed against; wall time since launch, start-up included, is
printed beside it.  The curves go to
``bench/results/quality-<label>.json``; ``--plot`` draws runs side by side as one PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charnn.train.metrics import Point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
THRESHOLDS = (1.60, 1.50, 1.45, 1.40, 1.35)
# Every byte on 127.0.0.1: loopback.env, the one copy (KEY=VALUE lines, # comments).
LOOPBACK = dict(line.split("=", 1) for line in Path(ROOT, "loopback.env").read_text().splitlines()
                if line[:1].isalpha())

def curves_of(points: dict[str, list[Point]], started: float) -> dict:
    """The train and validation curves of a run's logged points (``metrics.jsonl``): minutes are
    the training clock's (``train_seconds``) and the wall clock's since ``started`` (a POSIX time)."""
    def point(p: Point) -> dict:
        return {"step": p.step, "loss": p.loss, "accuracy": p.accuracy, "train_s": p.train_seconds,
                "wall_s": p.time - started, **({"epoch": p.epoch} if p.epoch is not None else {})}

    return {split: [point(p) for p in points[split]] for split in ("train", "val")}


def time_to(curves: dict, threshold: float) -> dict | None:
    """The first validation point at or below ``threshold``."""
    return next((point for point in curves["val"] if point["loss"] <= threshold), None)


def run(spec: str, overrides: list[str], label: str) -> dict:
    """Train ``spec`` under a fresh run name; its curves, read from the run's ``metrics.jsonl``."""
    from charnn.storage import Store
    from charnn.train.metrics import read_points

    name = f"quality-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "--spec", spec, "--set", f"run.name={name}"]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **LOOPBACK})
    sys.stdout.write(process.stdout)
    if process.returncode:
        sys.exit(f"bench/quality.py: {' '.join(command)} exited {process.returncode}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    curves = curves_of(read_points(Store(), result["run_url"]), started)
    return {"label": label, "spec": spec, "overrides": overrides, "run": name, **curves, "wall_s": time.time() - started}


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
