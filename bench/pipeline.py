"""Pipeline benchmark: the Ray Data build against the plain Ray task build that it replaced
(``--tasks-rev``, run from a git worktree of that commit) and against a bare single-process
baseline of the same job, side by side in one run.

    .venv/bin/python bench/pipeline.py              # figures (a) to (e) below (about 15 minutes on 2 cores)
    .venv/bin/python bench/pipeline.py --quick      # the same at small sizes: a smoke run (a few minutes)
    .venv/bin/python bench/pipeline.py --only c     # one figure
    .venv/bin/python bench/pipeline.py --grow       # (g), the rebuilds after growth (= --only g)

Corpora are the Shakespeare plays (``corpus:shakespeare``) cut into files of equal size in nested
directories (1,000 a directory), each starting with its own number so that no two are alike; they
are made once under ``--workdir`` (a few minutes, the first time) and reused.  Every measurement
runs in a fresh subprocess, so that its peak RSS is its own, with every byte on loopback
(loopback.env); the plain-task engine's in its worktree, as its working directory too (Ray
workers import ``charnn`` from the driver's).
Printed, each with its target (figures (a) to (e) run every stage on Ray Data, however small:
``data.in_process_mb=0``):

(a) ``--mb`` (40 MB) as 20, 20,000 and 200,000 documents: the whole ``jobs/tokenize_corpus.py`` job
    (Ray start-up included, as a user runs it) and the build alone (Ray up), for Ray Data and for
    plain tasks: Ray Data / tasks for the job (target <= 1.2) and for the build alone; and Ray
    Data's job on many documents against few, 20,000/20 and 200,000/20 (target <= 1.5);
(b) 200 MB in 20 files, the build alone: Ray Data's MB/s against the single-process baseline's
    (target >= 1.0), beside one core's ``bytes.translate`` (the gorner98 table) over the same
    200 MB in memory;
(c) steady state, 200 MB and 1 GB in 20 files: the extra MB over the extra seconds, Ray Data's
    against the baseline's (target >= 1.0);
(d) the driver's peak RSS (VmHWM) in the Ray Data build of 40 MB as 200,000 documents against 1,000
    (target <= 1.5);
(e) the object store's peak during the Ray Data build of 1 GB (the cluster's usage, polled every
    0.2 s), against the corpus's size and the store's capacity;
(g) ``--grow`` (``--only g``, not in the default run): 1 GB as 20,000 documents and 200 MB as
    100,000, each built once into an empty dataset root, then grown by +1% of its documents,
    then +10%, then one document, rebuilt after each step into the same root.  Every build is
    ``build_dataset`` alone (Ray up, not ``jobs/tokenize_corpus.py``: Ray's start-up is the same
    few seconds for any build and is no part of what a rebuild saves) in a fresh subprocess, as
    a job runs it: a stage of under ``data.in_process_mb`` (64 MiB) of input in its own process.
    The new documents are new files of the same size, numbered on from the old ones, in new
    directories that sort after the old ones (a corpus appended to).  Printed per step: the
    rebuild's seconds against the first build's (target <= 0.10 at +1% of 1 GB), the share of
    the rebuild that listing takes (``list_documents`` timed alone on the grown corpus in the
    same subprocess, right after the build, beside the build's own summary's "listing and
    encoding", which includes the cache lookup and the encoding of the new documents), and the
    bytes the rebuild wrote against the first build's (target <= 0.05 at +1%): the sizes of the
    files new or changed under the dataset root (the dataset directory and the document cache),
    by (path, size, mtime_ns) before and after.  Its corpora are ``grow-*`` under ``--workdir``,
    cut back to their first documents at the start of each run.

``--quick``: 4 MB as 20 and 2,000 documents (RSS from 200 to 2,000), 20 MB for 200 MB, 60 MB for 1 GB;
(g) 40 MB as 2,000 documents and 10 MB as 5,000.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, WORKERS, SEQ_LEN = 200, 2, 30
# Every byte on 127.0.0.1: loopback.env, the one copy (KEY=VALUE lines, # comments).
LOOPBACK = dict(line.split("=", 1) for line in Path(ROOT, "loopback.env").read_text().splitlines()
                if line[:1].isalpha())
PER_DIRECTORY = 1000
POLL_S = 0.2
MEASURED: dict[tuple, dict] = {}  # (mode, corpus, engine): one measurement, shared by the figures


@dataclass(frozen=True)
class Sizes:
    mb: float = 40.0  # (a) and (d)
    counts: tuple = (20, 20_000, 200_000)  # (a): the first is "few"
    rss: tuple = (1_000, 200_000)  # (d)
    small_mb: float = 200.0  # (b) and (c)
    large_mb: float = 1000.0  # (c) and (e)
    files: int = 20  # (b), (c) and (e)
    grow: tuple = ((1000.0, 20_000), (200.0, 100_000))  # (g): (MB, documents) of each corpus


FULL = Sizes()
QUICK = Sizes(mb=4.0, counts=(20, 2_000), rss=(200, 2_000), small_mb=20.0, large_mb=60.0,
              grow=((40.0, 2_000), (10.0, 5_000)))
GROWTH = (("+1%", 0.01), ("+10%", 0.10), ("+1 document", 0.0))  # (g): each step adds this share, at least one


def plays() -> bytes:
    from charnn.data.corpora import corpus_path

    directory = corpus_path("shakespeare")
    return b"".join(open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory)))


def make_corpus(directory: str, total_bytes: int, documents: int, first: int = 0) -> str:
    """``documents`` files of about total_bytes/documents bytes each, numbered from ``first``
    (the plays over again where a document is longer than they are): from 0 they replace the
    directory, from any later number they are added to it (a corpus that grows)."""
    stamp = os.path.join(directory, f".corpus-{total_bytes}-{documents}-{first}")
    if os.path.exists(stamp):
        return directory
    if first == 0:
        shutil.rmtree(directory, ignore_errors=True)
    text, size = plays(), total_bytes // documents
    for n in range(first, first + documents):
        sub = os.path.join(directory, f"d{n // PER_DIRECTORY:05d}")
        if n % PER_DIRECTORY == 0 or n == first:
            os.makedirs(sub, exist_ok=True)
        header = f"Document {n}.\n".encode()
        start, left = (n * size) % len(text), max(0, size - len(header))
        with open(os.path.join(sub, f"doc-{n:07d}.txt"), "wb") as f:
            f.write(header)
            while left:
                piece = text[start : start + left]
                f.write(piece)
                start, left = 0, left - len(piece)
    open(stamp, "w").close()
    return directory


def corpus_of(work: str, mb: float, documents: int) -> str:
    """The corpus, read once so that it is in the page cache: a corpus that other runs evicted
    costs its first reader seconds of disk reads (a 200,000-document build went from 6.5 to 18 s)."""
    return warm(make_corpus(os.path.join(work, f"corpus-{mb:g}mb-{documents}"), int(mb * 1e6), documents))


def warm(corpus: str) -> str:
    """``corpus``, every file of it read once (into the page cache)."""
    for directory, _, names in os.walk(corpus):
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                while f.read(2**24):
                    pass
    return corpus


def request(corpus: str, root: str, ray_data: bool = False):
    """The build's request; ``ray_data``: every stage on Ray Data's tasks, however small its input
    (``data.in_process_mb=0``; the plain-task engine has no such setting: it always ran on Ray)."""
    from charnn.data.build import DatasetRequest

    wanted = DatasetRequest(sources=[corpus], alphabet="gorner98", seq_len=SEQ_LEN, rows=ROWS, workers=WORKERS,
                            val_fraction=0.1, shard_mb=64, dataset_root=root)
    if ray_data and hasattr(getattr(wanted, "stage", None), "in_process_bytes"):
        wanted = dataclasses.replace(wanted, stage=dataclasses.replace(wanted.stage, in_process_bytes=0))
    return wanted


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


def translate(corpus: str, root: str) -> dict:
    """One core's ``bytes.translate`` with the gorner98 table over the corpus, read into memory first."""
    from charnn.data.alphabet import _GORNER_TABLE

    texts = [open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(corpus) for f in fs if not f.startswith(".")]
    started = time.perf_counter()
    for text in texts:
        text.translate(_GORNER_TABLE)
    return {"seconds": time.perf_counter() - started}


class StoreWatcher(threading.Thread):
    """The cluster's object store usage, polled every ``POLL_S`` until ``stop``: its peak, and what
    was spilled to disk (the raylet's own figures, as ``ray memory --stats-only`` prints them)."""

    def __init__(self):
        import ray
        from ray._private.internal_api import get_state_from_address

        super().__init__(daemon=True)
        # this cluster's address: with none, Ray would take the newest cluster on the machine
        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        node = next(node for node in self.state.node_table() if node["Alive"])  # the one node, asked once
        self.raylet = (node["NodeManagerAddress"], node["NodeManagerPort"])
        self.done, self.polls, self.peak, self.spilled, self.error = threading.Event(), 0, 0, 0, None
        self.start()

    def run(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        try:
            while True:
                stats = get_memory_info_reply(self.state, *self.raylet).store_stats
                self.peak = max(self.peak, stats.object_store_bytes_used + stats.object_store_bytes_fallback)
                self.spilled, self.polls = stats.spilled_bytes_total, self.polls + 1
                if self.done.wait(POLL_S):
                    return
        except Exception as exc:  # noqa: BLE001 - reported by stop(), in the parent
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> dict:
        import ray

        self.done.set()
        self.join()
        if self.error:
            raise SystemExit(f"polling the object store failed: {self.error}")
        return {"store_peak_mib": self.peak / 2**20, "spilled_mib": self.spilled / 2**20, "polls": self.polls,
                "store_mib": ray.cluster_resources()["object_store_memory"] / 2**20}


def charnn_home() -> str:
    import charnn

    return os.path.dirname(os.path.dirname(os.path.realpath(charnn.__file__)))


def pipeline(corpus: str, root: str, watch: bool = False) -> dict:
    """The Ray pipeline's build alone, on a Ray that is already up (``watch``: with the object
    store polled meanwhile), and where the driver and a Ray worker imported ``charnn`` from."""
    import ray

    from charnn.data.build import catalogue, write_dataset

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    watcher = StoreWatcher() if watch else None
    started = time.perf_counter()
    documents = catalogue(request(corpus, root, ray_data=True))
    catalogued = time.perf_counter()
    write_dataset(request(corpus, root, ray_data=True), documents)
    written = time.perf_counter()
    result = {"seconds": written - started, "catalogue": catalogued - started, "write": written - catalogued,
              **(watcher.stop() if watcher else {})}
    result["charnn"] = [charnn_home(), ray.get(ray.remote(charnn_home).remote())]
    ray.shutdown()
    return result


def rebuild(corpus: str, root: str) -> dict:
    """``build_dataset`` into ``root`` as it is (Ray up), then ``list_documents`` alone on the same
    corpus (what the build's own listing costs, caches as warm as they were for the build), then
    ``listed_documents`` (the same listing with the splits and the document cache's lookup)."""
    import ray

    from charnn.data.build import build_dataset, listed_documents
    from charnn.data.sources import list_documents

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    url = build_dataset(request(corpus, root)).url
    built = time.perf_counter()
    listed = list_documents([corpus]).num_rows
    listing = time.perf_counter()
    listed_documents(request(corpus, root))  # the listing, the splits and the cache lookup
    result = {"seconds": built - started, "listing": listing - built, "lookup": time.perf_counter() - listing,
              "listed": listed, "version": url, "charnn": [charnn_home(), ray.get(ray.remote(charnn_home).remote())]}
    ray.shutdown()
    return result


def child(mode: str, corpus: str, root: str) -> None:
    if mode == "grow":
        result = rebuild(corpus, root)
    elif mode in ("pipeline", "store"):
        shutil.rmtree(root, ignore_errors=True)
        result = pipeline(corpus, root, watch=mode == "store")
    else:
        shutil.rmtree(root, ignore_errors=True)
        result = (baseline if mode == "baseline" else translate)(corpus, root)
    # VmHWM, not ru_maxrss: Linux carries a parent's peak into its child's ru_maxrss
    status = open("/proc/self/status").read()
    result["peak_rss_mb"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps(result))


def engine_env(engine: str) -> dict:
    """Where a process runs ``engine``'s code: its checkout first on the path and as the working
    directory (Ray puts the driver's working directory first on its workers' paths)."""
    return {**os.environ, **LOOPBACK, "PYTHONPATH": engine}


def measure(mode: str, corpus: str, work: str, engine: str = ROOT) -> dict:
    """One measurement in a fresh subprocess, once a run: ``pipeline`` (the build alone), ``store``
    (the same, with the object store polled), ``baseline`` or ``translate``."""
    key = (mode, corpus, engine)
    if key not in MEASURED:
        MEASURED[key] = run_child(mode, corpus, os.path.join(work, "out"), engine)[0]
    return MEASURED[key]


def run_child(mode: str, corpus: str, root: str, engine: str = ROOT) -> tuple[dict, str]:
    """``--child mode corpus root`` in a fresh subprocess: its JSON result and its stderr."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, corpus, root],
                         capture_output=True, text=True, env=engine_env(engine), cwd=engine)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    homes = result.pop("charnn", [engine])
    if any(home != os.path.realpath(engine) for home in homes):
        raise SystemExit(f"{mode} on {engine}: the driver and a worker imported charnn from {homes}")
    return result, out.stderr


def tokenize_job(corpus: str, work: str, engine: str = ROOT) -> float:
    """Seconds of ``engine``'s ``jobs/tokenize_corpus.py`` from a clean dataset root, as a user runs it."""
    root = os.path.join(work, "out")
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "jobs/tokenize_corpus.py", "--spec", "jobs/specs/shakespeare.yaml",
                    "--set", f"data.sources=[{corpus}]", "--set", f"data.dataset_root={root}",
                    "--set", f"cluster.num_workers={WORKERS}", "--set", f"train.batch_per_worker={ROWS // WORKERS}",
                    *(["--set", "data.in_process_mb=0"] if engine == ROOT else [])],
                   check=True, capture_output=True, env=engine_env(engine), cwd=engine)
    return time.perf_counter() - started


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True, text=True).stdout.strip()


def tasks_engine(work: str, rev: str) -> str:
    """A clean git worktree checked out at ``rev`` (the plain-task build): one that exists, else a
    new one, ``<workdir>/engine-<rev>``."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    listed = [block.splitlines() for block in git("worktree", "list", "--porcelain").split("\n\n")]
    for path in [lines[0].split(" ", 1)[1] for lines in listed if f"HEAD {commit}" in lines]:
        clean = not git("-C", path, "status", "--porcelain", "--untracked-files=no")
        if os.path.realpath(path) != os.path.realpath(ROOT) and clean:
            return path
    path = os.path.join(os.path.abspath(work), f"engine-{rev}")
    git("worktree", "add", "--detach", path, commit)
    return path


def size_mb(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs
               if not f.startswith(".")) / 1e6


def figure_a(work: str, sizes: Sizes, tasks: str) -> None:
    print(f"(a) plain tasks: {git('-C', tasks, 'log', '-1', '--format=%h %s')[:80]} (in {tasks})", flush=True)
    runs = {}
    for n in sizes.counts:
        corpus = corpus_of(work, sizes.mb, n)
        data, plain = ({"job": tokenize_job(corpus, work, engine), "build": measure("pipeline", corpus, work, engine)}
                       for engine in (ROOT, tasks))
        runs[n] = data
        print(f"(a) {size_mb(corpus):,.0f} MB as {n:>7,} documents: tokenize job Ray Data {data['job']:6.1f} s, "
              f"tasks {plain['job']:6.1f} s: {data['job'] / plain['job']:.2f} (target <= 1.2); build alone "
              f"{data['build']['seconds']:6.1f} s, {plain['build']['seconds']:6.1f} s: "
              f"{data['build']['seconds'] / plain['build']['seconds']:.2f}", flush=True)
    few = sizes.counts[0]
    for n in sizes.counts[1:]:
        print(f"(a) Ray Data, {n:,} against {few} documents: tokenize job {runs[n]['job'] / runs[few]['job']:.2f} "
              f"(target <= 1.5); build alone {runs[n]['build']['seconds'] / runs[few]['build']['seconds']:.2f}",
              flush=True)


def figure_b(work: str, sizes: Sizes) -> None:
    corpus = corpus_of(work, sizes.small_mb, sizes.files)
    mb = size_mb(corpus)
    data, bare, table = (measure(mode, corpus, work)["seconds"] for mode in ("pipeline", "baseline", "translate"))
    print(f"(b) {mb:,.0f} MB in {sizes.files} files, build alone: Ray Data {data:.1f} s ({mb / data:.1f} MB/s), "
          f"baseline {bare:.1f} s ({mb / bare:.1f} MB/s): {bare / data:.2f} (target >= 1.0); one core's "
          f"bytes.translate in memory: {mb / table:,.0f} MB/s", flush=True)


def figure_c(work: str, sizes: Sizes) -> None:
    small, large = (corpus_of(work, mb, sizes.files) for mb in (sizes.small_mb, sizes.large_mb))
    extra, rates = size_mb(large) - size_mb(small), {}
    for mode, label in (("pipeline", "Ray Data"), ("baseline", "baseline")):
        before, after = (measure(mode, corpus, work)["seconds"] for corpus in (small, large))
        rates[mode] = extra / max(after - before, 1e-3)
        print(f"(c) steady state, {label:8}: {before:.1f} s on {sizes.small_mb:g} MB, {after:.1f} s on "
              f"{sizes.large_mb:g} MB: {rates[mode]:.1f} MB/s", flush=True)
    print(f"(c) steady state, Ray Data / baseline: {rates['pipeline'] / rates['baseline']:.2f}  (target >= 1.0)",
          flush=True)


def figure_d(work: str, sizes: Sizes) -> None:
    few, many = sizes.rss
    rss = {n: measure("pipeline", corpus_of(work, sizes.mb, n), work)["peak_rss_mb"] for n in sizes.rss}
    print(f"(d) driver peak RSS, Ray Data build of {sizes.mb:g} MB: {rss[few]:,.0f} MB as {few:,} documents, "
          f"{rss[many]:,.0f} MB as {many:,}: {rss[many] / rss[few]:.2f}  (target <= 1.5)", flush=True)


def figure_e(work: str, sizes: Sizes) -> None:
    corpus = corpus_of(work, sizes.large_mb, sizes.files)
    run, corpus_mib = measure("store", corpus, work), size_mb(corpus) * 1e6 / 2**20
    peak, capacity = run["store_peak_mib"], run["store_mib"]
    print(f"(e) object store peak, Ray Data build of {corpus_mib:,.0f} MiB in {sizes.files} files "
          f"({run['seconds']:.1f} s, {run['polls']} polls): {peak:,.2f} MiB, {peak / corpus_mib:.2%} of the corpus "
          f"and {peak / capacity:.2%} of the store's {capacity:,.0f} MiB; {run['spilled_mib']:,.0f} MiB spilled",
          flush=True)


def grow_corpus(work: str, mb: float, documents: int) -> str:
    """(g)'s corpus of ``documents`` documents, without the documents an earlier run added to it,
    in the page cache."""
    corpus = make_corpus(os.path.join(work, f"grow-{mb:g}mb-{documents}"), int(mb * 1e6), documents)
    for directory, _, names in os.walk(corpus, topdown=False):
        for name in names:
            added = name.startswith("doc-") and int(name[4:-4]) >= documents
            if added or (name.startswith(".corpus-") and not name.endswith("-0")):
                os.remove(os.path.join(directory, name))
        if directory != corpus and not os.listdir(directory):
            os.rmdir(directory)
    return warm(corpus)


def files_under(root: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(directory, name))
            found[os.path.join(directory, name)] = (st.st_size, st.st_mtime_ns)
    return found


def grow_build(corpus: str, root: str) -> dict:
    """One build of ``corpus`` into ``root`` as it is: its seconds, its listing's, the bytes of the
    files it made or changed under ``root`` and the build's own summary line."""
    before = files_under(root)
    result, stderr = run_child("grow", corpus, root)
    after = files_under(root)
    result["written"] = sum(size for path, (size, mtime) in after.items() if before.get(path) != (size, mtime))
    summary = [line for line in stderr.splitlines() if line.startswith("charnn.pipeline:")]
    result["summary"] = summary[-1] if summary else ""
    found = re.search(r"listing and encoding ([\d.]+) s", result["summary"])
    result["catalogue"] = float(found.group(1)) if found else None
    return result


def grow_step(label: str, added: int, step: dict, first: dict) -> str:
    """One printed line of (g): a rebuild against the corpus's first build."""
    target = label == GROWTH[0][0]
    laid = re.search(r"laid out (\d+) documents.*?; (\d+) wait", step["summary"])
    segment = (f"new segment of {int(laid.group(1)):,} documents, {int(laid.group(2)):,} wait" if laid else
               "no new segment (the build's summary was not printed: the new text waits for a step)")
    catalogue = "not printed" if step["catalogue"] is None else f"{step['catalogue']:.2f} s"
    return (f"(g)   {label:>11} (+{added:,}, {step['listed']:,} documents): rebuild {step['seconds']:.2f} s = "
            f"{step['seconds'] / first['seconds']:.3f} of the first{' (target <= 0.10 at 1 GB)' if target else ''}; "
            f"listing {step['listing']:.2f} s = {step['listing'] / step['seconds']:.0%} of it (list_documents alone; "
            f"with the cache lookup {step['lookup']:.2f} s; the build's \"listing and encoding\" {catalogue}); "
            f"written {step['written'] / 1e6:,.2f} MB = {step['written'] / first['written']:.4f} of the first"
            f"{' (target <= 0.05)' if target else ''}; {segment}")


def figure_g(work: str, sizes: Sizes) -> None:
    for mb, documents in sizes.grow:
        corpus, root = grow_corpus(work, mb, documents), os.path.join(work, "grow-out")
        shutil.rmtree(root, ignore_errors=True)
        first, count, size = grow_build(corpus, root), documents, int(mb * 1e6) // documents
        print(f"(g) {size_mb(corpus):,.0f} MB as {documents:,} documents: first build {first['seconds']:.2f} s "
              f"(listing {first['listing']:.2f} s), {first['written'] / 1e6:,.1f} MB written; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for label, share in GROWTH:
            added = max(1, round(documents * share))
            make_corpus(corpus, added * size, added, first=count)  # new files, numbered on: they sort last
            count += added
            step = grow_build(corpus, root)
            if step["listed"] != count:
                raise SystemExit(f"(g) {corpus}: {step['listed']} documents listed, not {count}")
            print(grow_step(label, added, step, first), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--only", choices="abcdeg", help="run one figure")
    parser.add_argument("--grow", action="store_true", help="figure (g) alone: rebuilds after the corpus grows")
    parser.add_argument("--mb", type=float, help="corpus size for (a) and (d) (default 40, 4 with --quick)")
    parser.add_argument("--tasks-rev", default="2eded07", help="the commit of the plain-task build, for (a)")
    parser.add_argument("--workdir", default="/tmp/charnn-bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    sizes = QUICK if args.quick else FULL
    sizes = dataclasses.replace(sizes, mb=args.mb or sizes.mb)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.1f}; R={ROWS} T={SEQ_LEN} W={WORKERS}", flush=True)
    started = time.perf_counter()
    figures = {"a": lambda: figure_a(work, sizes, tasks_engine(work, args.tasks_rev)),
               "b": lambda: figure_b(work, sizes), "c": lambda: figure_c(work, sizes),
               "d": lambda: figure_d(work, sizes), "e": lambda: figure_e(work, sizes),
               "g": lambda: figure_g(work, sizes)}
    for name in "g" if args.grow else args.only or "abcde":
        figures[name]()
    print(f"{time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
