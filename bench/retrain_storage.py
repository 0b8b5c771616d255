"""Scheduled retraining as its corpus grows: what it stores, and how much of the new text a fine-tune reads.

    .venv/bin/python bench/retrain_storage.py             # both figures (about 10 minutes each on 2 cores)
    .venv/bin/python bench/retrain_storage.py --only s    # one figure
    .venv/bin/python bench/retrain_storage.py --quick     # (s) in 4 rounds on 4 MB, (n) as it is

Every round is the real ``python -m charnn.cli.retrain --spec jobs/specs/shakespeare-retrain.yaml``
in a fresh subprocess (an embedded Ray, every byte on loopback: loopback.env), with ``--set``
overrides only where named below; its last stdout line is its JSON result.  Everything lives
under ``--workdir``, made again at each run.

(s) storage: a corpus of distinct documents (``bench/pipeline.py``'s ``make_corpus``: 15 MB as
    1,500 documents, 5% for validation) and a tiny model (GRU 32 x 1, one worker of 32 rows, 40
    steps from scratch and at most 100 a fine-tune).  Round 1 trains from scratch on the corpus; before each later
    round 1% of its first documents are added as new files (numbered on, so in directories that
    sort after the old ones).  After each round: the bytes under data.dataset_root (the document
    cache and the dataset) and run.storage (the registry: published versions, candidates'
    runs, rejected records), and the ratio of the last round's to the first's (target <= 1.3).
    Retention is ``charnn.cli.retrain``'s own where it runs it (its result has "gc"), else
    ``python -m charnn.cli.gc --apply --min-age-minutes 0`` after the round if that exists, else
    none; each round says which.  Retrain's own keeps every dataset version written in the last
    hour and anything else of the dataset root that young (``charnn.retention.DEFAULT_MIN_AGE_S``),
    which here, rounds minutes apart, is every round's; ``--gc-cli`` runs the gc command after
    every round too, as if they were hours apart.
(n) new text read: the Shakespeare plays (``corpus:shakespeare``) but one, copied into a corpus
    directory, retrained once (from scratch: ``train.steps`` cut to ``--first-steps``, which
    decides nothing of what follows), then the play copied in and retrained again with the
    spec as it is: ``new_tokens_seen / new_tokens`` from round 2's result.  The play held out is
    the last (in URL order) that the split rule puts in training, unless ``--play`` names one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "jobs/specs/shakespeare-retrain.yaml"
RETRAIN_SOURCE = os.path.join(ROOT, "charnn", "cli", "retrain.py")


def bench_pipeline():
    """``bench/pipeline.py`` as a module: its corpora and its loopback environment."""
    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(ROOT, "bench", "pipeline.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


PIPELINE = bench_pipeline()


@dataclass(frozen=True)
class Sizes:
    mb: float = 15.0
    documents: int = 1_500
    rounds: int = 10


FULL, QUICK = Sizes(), Sizes(mb=4.0, documents=400, rounds=4)
TINY = ["model.cell_size=32", "model.layers=1", "model.dropout=0.0", "cluster.num_workers=1",
        "train.batch_per_worker=32", "train.steps=40", "train.warmup_steps=0", "train.log_every=20",
        "train.validate_every=0", "train.checkpoint_every=0", "train.sample_length=20", "retrain.steps=100",
        "data.val_fraction=0.05", "cluster.connect_timeout_s=600"]


def overrides(work: str, corpus: str, *more: str) -> list[str]:
    """``--set`` arguments: the corpus, data.dataset_root and run.storage under ``work``, and ``more``."""
    sets = [f"data.sources=[{corpus}]", f"data.dataset_root={work}/datasets", f"run.storage={work}/runs", *more]
    return [arg for value in sets for arg in ("--set", value)]


def command(module: str, sets: list[str], *extra: str) -> tuple[dict, float]:
    """``python -m module --spec SPEC sets extra`` as a user runs it: its JSON result and seconds."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", module, "--spec", SPEC, *sets, *extra], capture_output=True,
                         text=True, env=PIPELINE.engine_env(ROOT), cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{module} exited {out.returncode}:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), time.perf_counter() - started


def gc_command() -> bool:
    """Whether ``python -m charnn.cli.gc`` exists here."""
    return importlib.util.find_spec("charnn.cli.gc") is not None


def bytes_under(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def storage(work: str) -> dict[str, int]:
    """Bytes of each part of the dataset root and the run storage."""
    datasets, runs = os.path.join(work, "datasets"), os.path.join(work, "runs")
    parts = {"document cache": os.path.join(datasets, "documents")}
    parts.update({f"dataset {name}": os.path.join(datasets, name) for name in sorted(os.listdir(datasets))
                  if name != "documents"})
    models = os.path.join(runs, "models")
    for model in sorted(os.listdir(models)) if os.path.isdir(models) else []:
        for name in ("versions", "candidates", "rejected"):
            parts[f"registry {name}"] = os.path.join(models, model, name)
    sizes = {label: bytes_under(path) for label, path in parts.items()}
    sizes["total"] = bytes_under(datasets) + bytes_under(runs)
    sizes["other"] = sizes["total"] - sum(sizes[label] for label in parts)  # leases, pointers, anything else
    return sizes


def swept(result: dict) -> str:
    """What a gc result says it removed, in brief."""
    if not isinstance(result.get("bytes"), int):
        return json.dumps(result)[:200]
    kinds = {k: v for k, v in result.get("bytes_by_kind", {}).items() if v}
    return f"{result.get('action')}, {result['bytes'] / 1e6:.2f} MB removed ({json.dumps(kinds)})"


def storage_round(work: str, corpus: str, number: int, gc_cli: bool) -> dict[str, int]:
    """One retrain round, and the gc command after it where the round ran no retention itself (its
    result has no "gc") or ``gc_cli`` asks for it: the storage it leaves."""
    result, seconds = command("charnn.cli.retrain", overrides(work, corpus, *TINY))
    own = isinstance(result.get("gc"), dict)
    cleaned = f"retention by retrain itself: {swept(result['gc'])}" if own else "retrain ran no retention"
    if (gc_cli or not own) and gc_command():
        gc, gc_seconds = command("charnn.cli.gc", overrides(work, corpus, *TINY), "--apply", "--min-age-minutes", "0")
        cleaned += f"; python -m charnn.cli.gc --apply --min-age-minutes 0, {gc_seconds:.0f} s: {swept(gc)}"
    elif not own:
        cleaned += " and there is no charnn.cli.gc: NO retention"
    sizes = storage(work)
    print(f"(s) round {number:2}: {result.get('action')}, {result.get('new_documents')} new documents, "
          f"{seconds:.0f} s; {cleaned}", flush=True)
    print("(s)           " + ", ".join(f"{k} {v / 1e6:,.2f} MB" for k, v in sizes.items()), flush=True)
    return sizes


def figure_s(work: str, sizes: Sizes, gc_cli: bool) -> None:
    work = os.path.join(work, "storage")
    for name in ("datasets", "runs"):
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    corpus = PIPELINE.grow_corpus(work, sizes.mb, sizes.documents)
    size, count, added = int(sizes.mb * 1e6) // sizes.documents, sizes.documents, max(1, sizes.documents // 100)
    print(f"(s) {PIPELINE.size_mb(corpus):,.1f} MB as {count:,} documents, +{added} documents "
          f"({added * size / 1e6:.2f} MB) before each round after the first", flush=True)
    first = last = storage_round(work, corpus, 1, gc_cli)
    for number in range(2, sizes.rounds + 1):
        PIPELINE.make_corpus(corpus, added * size, added, first=count)
        count += added
        last = storage_round(work, corpus, number, gc_cli)
    print(f"(s) after round {sizes.rounds} against round 1: {last['total'] / 1e6:,.2f} / "
          f"{first['total'] / 1e6:,.2f} MB = {last['total'] / first['total']:.2f} (target <= 1.3); the corpus grew "
          f"{count / sizes.documents:.2f}x", flush=True)


def held_out_play(plays: str, name: str | None) -> str:
    """The play to add in round 2: ``name``, else the last one the split rule puts in training."""
    from charnn.data.sources import list_documents, split_array

    listing = list_documents([plays])
    splits = dict(zip(listing.column("key").to_pylist(), split_array(listing.column("key"), 0.1)))
    if name:
        if name not in splits:
            raise SystemExit(f"--play {name}: not one of the plays ({', '.join(sorted(splits))})")
        return name
    return max(key for key, split in splits.items() if split == "train")


def figure_n(work: str, play: str | None, first_steps: int) -> None:
    from charnn.data.corpora import corpus_path

    work, plays = os.path.join(work, "new-text"), corpus_path("shakespeare")
    shutil.rmtree(work, ignore_errors=True)
    corpus = os.path.join(work, "corpus")
    play = held_out_play(plays, play)
    shutil.copytree(plays, corpus, ignore=lambda d, names: [play] if d == plays else [])
    one, seconds = command("charnn.cli.retrain", overrides(work, corpus, f"train.steps={first_steps}"))
    print(f"(n) round 1, {len(os.listdir(corpus))} plays (not {play}), train.steps={first_steps}: {one.get('action')}, "
          f"val_loss {one.get('candidate_val_loss')}, {seconds:.0f} s", flush=True)
    shutil.copy(os.path.join(plays, play), corpus)
    two, seconds = command("charnn.cli.retrain", overrides(work, corpus))
    print(f"(n) round 2, {play} added ({os.path.getsize(os.path.join(corpus, play)):,} bytes), the spec as it is: "
          f"{two.get('action')}, {two.get('new_documents')} new documents, val_loss {two.get('candidate_val_loss')} "
          f"against {two.get('incumbent_val_loss')}, {seconds:.0f} s", flush=True)
    if two.get("new_tokens_seen") is None or not two.get("new_tokens"):
        print(f"(n) the result has no new_tokens_seen / new_tokens figures; it holds: {json.dumps(two)}", flush=True)
        return
    print(f"(n) new_tokens_seen / new_tokens: {two['new_tokens_seen']:,} / {two['new_tokens']:,} = "
          f"{two['new_tokens_seen'] / two['new_tokens']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="(s) on 4 MB in 4 rounds: a smoke run")
    parser.add_argument("--only", choices="sn", help="run one figure")
    parser.add_argument("--gc-cli", action="store_true",
                        help="(s): the gc command after every round even where retrain runs retention itself")
    parser.add_argument("--play", help="(n): the play added in round 2 (a file name of corpus:shakespeare)")
    parser.add_argument("--first-steps", type=int, default=100, help="(n): round 1's train.steps (default 100)")
    parser.add_argument("--workdir", default="/tmp/charnn-bench")
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {SPEC}", flush=True)
    started = time.perf_counter()
    figures = {"s": lambda: figure_s(work, QUICK if args.quick else FULL, args.gc_cli),
               "n": lambda: figure_n(work, args.play, args.first_steps)}
    for name in args.only or "sn":
        figures[name]()
    print(f"{time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
