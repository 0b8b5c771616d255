"""Pipeline benchmark: what the Ray Data build costs by bytes and by file count, against a bare
single-process baseline of the same job.

    .venv/bin/python bench/pipeline.py                      # every figure below (about 15 minutes)
    .venv/bin/python bench/pipeline.py --documents 20000    # one corpus: MB/s, files/s, driver RSS

Corpora are the Shakespeare plays (``corpus:shakespeare``) cut into ``--documents`` files of
equal size in nested directories (1,000 a directory), each starting with its own number so
that no two are alike.  Every measurement runs in a fresh subprocess, so that its peak RSS is
its own.  Printed, each with its target:

- the same ``--mb`` as 20, 20,000 and 200,000 documents: the whole ``jobs/tokenize_corpus.py`` job
  (Ray start-up included, as a user runs it) and the build alone, and time(many)/time(few);
- the driver's peak RSS from 1,000 to 200,000 documents;
- steady state on many documents (2 KB each): the extra megabytes of a 10x larger corpus over
  the extra seconds, for the baseline and the Ray pipeline, and their ratio;
- a rebuild after adding 1% new documents, against the first build.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, WORKERS, SEQ_LEN = 200, 2, 30
# Every byte on 127.0.0.1: loopback.env, the one copy (KEY=VALUE lines, # comments).
LOOPBACK = dict(line.split("=", 1) for line in Path(ROOT, "loopback.env").read_text().splitlines()
                if line[:1].isalpha())
PER_DIRECTORY = 1000


def plays() -> bytes:
    from charnn.data.corpora import corpus_path

    directory = corpus_path("shakespeare")
    return b"".join(open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory)))


def make_corpus(directory: str, total_bytes: int, documents: int, first: int = 0) -> str:
    """``documents`` files of about total_bytes/documents bytes each, numbered from ``first``."""
    stamp = os.path.join(directory, f".built-{total_bytes}-{documents}-{first}")
    if os.path.exists(stamp):
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    text, size = plays(), total_bytes // documents
    for n in range(first, first + documents):
        sub = os.path.join(directory, f"d{n // PER_DIRECTORY:05d}")
        if n % PER_DIRECTORY == 0 or n == first:
            os.makedirs(sub, exist_ok=True)
        header = f"Document {n}.\n".encode()
        start = (n * size) % (len(text) - size)
        with open(os.path.join(sub, f"doc-{n:07d}.txt"), "wb") as f:
            f.write(header + text[start : start + max(0, size - len(header))])
    open(stamp, "w").close()
    return directory


def request(corpus: str, root: str):
    from charnn.data.build import DatasetRequest

    return DatasetRequest(sources=[corpus], alphabet="gorner98", seq_len=SEQ_LEN, rows=ROWS, workers=WORKERS,
                          val_fraction=0.1, shard_mb=64, dataset_root=root)


def baseline(corpus: str, root: str) -> dict:
    """The same job in one process: list, read, encode, lay out, write row shards (no cache, no Ray)."""
    import numpy as np

    from charnn.data.alphabet import encode
    from charnn.data.dataset import shard_table, write_shard_file
    from charnn.data.layout import plan_rows, plan_shards
    from charnn.data.sources import list_documents, split_array

    started = time.perf_counter()
    listing = list_documents([corpus])
    splits = split_array(listing.column("key").to_pylist(), 0.1)
    urls = listing.column("url").to_pylist()
    streams = {s: np.concatenate([encode(open(u, "rb").read()) for u, split in zip(urls, splits) if split == s])
               for s in ("train", "val")}
    os.makedirs(root, exist_ok=True)
    for split, stream in streams.items():
        layout = plan_rows(stream.size, ROWS if split == "train" else WORKERS, SEQ_LEN)
        T, L = layout.seq_len, layout.row_length
        for plan in plan_shards(layout, WORKERS, 64 * 2**20):
            s0, s1 = plan.steps.start, plan.steps.stop
            segments = np.stack([stream[r * L + s0 * T : r * L + s1 * T + 1] for r in plan.rows])
            with open(os.path.join(root, plan.name(split)), "wb") as sink:
                write_shard_file(sink, shard_table(plan.rows, s0 * T, segments))
    return {"seconds": time.perf_counter() - started}


def pipeline(corpus: str, root: str) -> dict:
    """The Ray pipeline's build alone, on a Ray that is already up: its two stages, listing and
    encoding (what the document cache saves) and writing the shards (the whole dataset, always)."""
    import ray

    from charnn.data.build import catalogue, write_dataset

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    documents = catalogue(request(corpus, root))
    catalogued = time.perf_counter()
    write_dataset(request(corpus, root), documents)
    written = time.perf_counter()
    ray.shutdown()
    return {"seconds": written - started, "catalogue": catalogued - started, "write": written - catalogued}


def child(mode: str, corpus: str, root: str) -> None:
    if mode != "rebuild":
        shutil.rmtree(root, ignore_errors=True)
    result = (baseline if mode == "baseline" else pipeline)(corpus, root)
    # VmHWM, not ru_maxrss: Linux carries a parent's peak into its child's ru_maxrss
    status = open("/proc/self/status").read()
    result["peak_rss_mb"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps(result))


def measure(mode: str, corpus: str, root: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, corpus, root], capture_output=True, text=True,
                         env={**os.environ, **LOOPBACK}, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def tokenize_job(corpus: str, root: str) -> float:
    """Seconds of ``jobs/tokenize_corpus.py`` from a clean dataset root, as a user runs it."""
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "jobs/tokenize_corpus.py", "--spec", "jobs/specs/shakespeare.yaml",
                    "--set", f"data.sources=[{corpus}]", "--set", f"data.dataset_root={root}",
                    "--set", f"cluster.num_workers={WORKERS}", "--set", f"train.batch_per_worker={ROWS // WORKERS}"],
                   check=True, capture_output=True, env={**os.environ, **LOOPBACK}, cwd=ROOT)
    return time.perf_counter() - started


def size_mb(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs
               if not f.startswith(".")) / 1e6


def one(work: str, mb: float, documents: int) -> dict:
    corpus = make_corpus(os.path.join(work, f"corpus-{mb:g}mb-{documents}"), int(mb * 1e6), documents)
    build = measure("pipeline", corpus, os.path.join(work, "out"))
    job = tokenize_job(corpus, os.path.join(work, "out"))
    real = size_mb(corpus)
    print(f"{documents:>9,} documents, {real:,.0f} MB: build {build['seconds']:6.1f} s ({real / build['seconds']:6.1f} MB/s, "
          f"{documents / build['seconds']:9,.0f} files/s); tokenize job {job:6.1f} s; driver peak RSS "
          f"{build['peak_rss_mb']:,.0f} MB", flush=True)
    return {"build": build["seconds"], "job": job, "rss": build["peak_rss_mb"]}


def steady_state(work: str, doc_bytes: int, small_mb: float, large_mb: float) -> None:
    corpora = {mb: make_corpus(os.path.join(work, f"corpus-{mb:g}mb-{int(mb * 1e6) // doc_bytes}"), int(mb * 1e6),
                               int(mb * 1e6) // doc_bytes) for mb in (small_mb, large_mb)}
    rates = {}
    for mode in ("baseline", "pipeline"):
        seconds = {mb: measure(mode, c, os.path.join(work, f"out-{mode}"))["seconds"] for mb, c in corpora.items()}
        rates[mode] = (size_mb(corpora[large_mb]) - size_mb(corpora[small_mb])) / (seconds[large_mb] - seconds[small_mb])
        print(f"steady state, {doc_bytes:,}-byte documents, {mode:8}: {seconds[small_mb]:.1f} s on {small_mb:g} MB, "
              f"{seconds[large_mb]:.1f} s on {large_mb:g} MB: {rates[mode]:.1f} MB/s", flush=True)
    print(f"steady state ratio, Ray pipeline / baseline: {rates['pipeline'] / rates['baseline']:.2f}  (target >= 1.0)")


def rebuild(work: str, mb: float, documents: int) -> None:
    corpus = make_corpus(os.path.join(work, f"corpus-{mb:g}mb-{documents}"), int(mb * 1e6), documents)
    root = os.path.join(work, "out-rebuild")
    first = measure("pipeline", corpus, root)
    added = make_corpus(os.path.join(corpus, "added"), int(mb * 1e6) // 100, documents // 100, first=documents)
    try:
        again = measure("rebuild", corpus, root)
    finally:
        shutil.rmtree(added)
    print(f"rebuild after adding 1% ({documents // 100:,} documents) to {documents:,}: {again['seconds']:.1f} s "
          f"against {first['seconds']:.1f} s for the first build: {again['seconds'] / first['seconds']:.2f}  "
          f"(target <= 0.10)\n  listing and encoding {again['catalogue']:.1f} s against {first['catalogue']:.1f} s: "
          f"{again['catalogue'] / first['catalogue']:.2f}; writing every shard anew {again['write']:.1f} s against "
          f"{first['write']:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, help="measure one corpus of this many documents")
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size for the file-count comparison")
    parser.add_argument("--workdir", default="/tmp/charnn-bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    print(f"{os.cpu_count()} cores; R={ROWS} T={SEQ_LEN} W={WORKERS}", flush=True)
    if args.documents:
        one(args.workdir, args.mb, args.documents)
        return
    runs = {n: one(args.workdir, args.mb, n) for n in (20, 1_000, 20_000, 200_000)}
    for n in (20_000, 200_000):
        print(f"{args.mb:g} MB as {n:,} against 20 documents: build {runs[n]['build'] / runs[20]['build']:.2f}, "
              f"tokenize job {runs[n]['job'] / runs[20]['job']:.2f}  (target <= {1.5 if n == 20_000 else 2})")
    print(f"driver peak RSS, 200,000 against 1,000 documents: {runs[200_000]['rss'] / runs[1_000]['rss']:.2f}  "
          f"(target <= 1.5)")
    steady_state(args.workdir, 2_000, 20, 200)
    rebuild(args.workdir, 200, 100_000)


if __name__ == "__main__":
    main()
