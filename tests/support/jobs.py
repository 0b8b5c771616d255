"""Running the entry points as a user would, on corpora generated here, and reading back what
they wrote."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from support.env import FAST_TRAIN_ENV, LOOPBACK_ENV, REPO

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows "
         "of outrageous fortune take arms against a sea troubles").split()
SMOKE_ROWS = 8


def write_corpus(directory: Path, documents: int, lines: int, seed: int = 0, prefix: str = "doc") -> list[Path]:
    """Seeded pseudo-text documents: small, varied, and the same on every run."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(documents):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."
                         for _ in range(lines))
        path = directory / f"{prefix}-{i:03d}.txt"
        path.write_text(text + "\n")
        paths.append(path)
    return paths


def run_job(script: str, *args: str, env: dict | None = None, check: bool = True, timeout: int = 600,
            cluster=None):
    """Run an entry point as a user would; returns (completed process, parsed last JSON line or None).

    With no ``cluster`` the job starts its own embedded Ray, the default a user gets.  With a
    ``RayCluster`` it joins that cluster as its driver (RAY_ADDRESS), as it runs under `ray job
    submit`: about 20 s less per job here.  Its workers then have the cluster's environment, so
    ``env`` reaches the driver only."""
    full_env = {**os.environ, **LOOPBACK_ENV, **FAST_TRAIN_ENV}
    full_env.pop("RAY_ADDRESS", None)
    full_env.update({**(cluster.driver_env if cluster else {}), **(env or {})})
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines and lines[-1].startswith("{") else None
    return proc, result


def last_json(text: str) -> dict | None:
    lines = [line for line in text.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def train_smoke(root: Path, name: str, workers: int, steps: int, *extra: str, **options):
    """jobs/train.py on the smoke model over ``root/corpus``: dropout 0, the global loss logged every
    step, no checkpoints or validation unless ``extra`` asks for them.  ``options`` go to run_job
    (env, check, timeout, cluster)."""
    return run_job(
        "train.py", "--spec", "jobs/specs/smoke.yaml",
        "--set", f"data.sources=[{root / 'corpus'}]", "--set", f"data.dataset_root={root / 'datasets'}",
        "--set", f"run.storage={root / 'runs'}", "--set", f"run.name={name}",
        "--set", f"cluster.num_workers={workers}", "--set", f"train.batch_per_worker={SMOKE_ROWS // workers}",
        "--set", f"train.steps={steps}", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0",
        "--set", "train.validate_every=0", "--set", "model.dropout=0.0", *extra, **options,
    )


def tb_losses(root: Path, name: str) -> dict[int, float]:
    """The train loss curve that a run wrote to TensorBoard, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "runs" / name / "tensorboard")).Reload().Scalars("train/loss")
    return {e.step: e.value for e in events}


def same_run(root: Path, name: str, result: dict, reference: tuple[str, dict], steps: int) -> float:
    """Assert that run ``name`` (its job's ``result``) ended as ``reference`` (its name and result)
    did: the same loss at each of ``steps`` steps (1e-5) and the same weights.  Returns the
    final validation-loss difference, for the fault table."""
    import pytest
    import torch

    full, ours = tb_losses(root, reference[0]), tb_losses(root, name)
    assert sorted(ours) == list(range(1, steps + 1))
    for step in full:
        assert ours[step] == pytest.approx(full[step], rel=1e-5), step
    saved = torch.load(f"{result['checkpoint']}/model.pt", weights_only=True)
    expected = torch.load(f"{reference[1]['checkpoint']}/model.pt", weights_only=True)
    for key, tensor in expected["model"].items():
        torch.testing.assert_close(saved["model"][key], tensor, rtol=1e-5, atol=1e-7)
    return abs(result["val_loss"] - reference[1]["val_loss"])
