"""Elastic training benchmark: what a lost node costs a run, and what a node added back brings.

    .venv/bin/python bench/elastic.py [--steps 90] [--checkpoint-every 20] [--kill-at 30]
                                      [--grow-at 50] [--resize-interval 10] [--start-timeout 60]

Starts a local multi-node Ray cluster with tests/support/cluster.py (a head of no CPUs on
127.0.0.2, three worker nodes of 1 CPU on 127.0.0.3-5; every byte on loopback) and trains the
smoke model with 2 workers (CPU, dropout 0, the loss logged every step, a checkpoint every
--checkpoint-every steps) through `ray job submit`, on local paths with storage.shared_path=true:

  (i)   spare:  3 worker nodes; rank 1's node is SIGKILLed after step --kill-at; the group
        restarts on the third node.
  (ii)  shrink: 2 worker nodes, cluster.min_workers=1; the same kill; 1 worker goes on.
  (iii) grow:   in run (ii), a node joins while the single worker is held after step --grow-at;
        the group grows back to 2 at the next resize check (cluster.resize_interval_s).

Faults (charnn/train/faults.py) hold the worker at the exact step, so the node is lost there.
For each it prints the seconds from the kill (or the join) to the first step trained after it and
to the first step past the one reached (both from the run's metrics.jsonl times), the steps
recomputed (reached minus the checkpoint resumed from), and beside them Ray Train's own view: the
controller's decisions and worker-group starts from its log on the head, and the run's attempts
from Ray Train's state API (RAY_TRAIN_ENABLE_STATE_TRACKING=1), in seconds from the same event.
--start-timeout sets cluster.start_timeout_s (Ray Train's worker-group start timeout; default 60).  On 2 cores it
takes about 3 minutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROLLER_EVENTS = ("Deciding to", "Attempting to start", "Started training worker group", "timed out",
                     "[FailurePolicy]")


def support_cluster():
    """tests/support/cluster.py, imported as the tests import it (package ``support``), no sys.path edit."""
    spec = importlib.util.spec_from_file_location("support", ROOT / "tests" / "support" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "tests" / "support")])
    sys.modules["support"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["support"])
    return importlib.import_module("support.cluster")


def train_args(work: Path, name: str, options, *extra: str) -> list[str]:
    return ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{work / 'corpus'}]",
            "--set", f"data.dataset_root={work / 'datasets'}", "--set", f"run.storage={work / 'runs'}",
            "--set", f"run.name={name}", "--set", "cluster.num_workers=2", "--set", "cluster.max_failures=3",
            "--set", "train.batch_per_worker=4", "--set", f"train.steps={options.steps}",
            "--set", "train.log_every=1", "--set", f"train.checkpoint_every={options.checkpoint_every}",
            "--set", "train.validate_every=0", "--set", "model.dropout=0.0", "--set", "storage.shared_path=true",
            "--set", f"cluster.start_timeout_s={options.start_timeout:g}",
            *extra]


def faults(directory: Path, spec: str) -> dict:
    return {"CHARNN_FAULTS": spec, "CHARNN_FAULT_DIR": str(directory), "CHARNN_FAULT_PAUSE_S": "600"}


def held(marker: Path, job) -> int:
    """Wait until a pause fault fired; the pid of the worker it holds."""
    while not (marker.exists() and marker.read_text()):
        if job.info()["status"] not in ("PENDING", "RUNNING"):
            raise SystemExit(f"the job ended before {marker.name}:\n{job.logs()[-3000:]}")
        time.sleep(0.1)
    return int(marker.read_text())


def train_points(work: Path, name: str) -> list[dict]:
    lines = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [p for p in map(json.loads, filter(str.strip, lines)) if p["split"] == "train"]


def figures(points: list[dict], event: float, reached: int, resumed: int) -> dict:
    """Seconds from ``event`` to the first step trained after it, and to the first step past ``reached``."""
    after = [p for p in points if p["time"] > event]
    first = after[0] if after else None
    past = next((p for p in after if p["step"] > reached), None)
    return {"reached": reached, "resumed": resumed, "recomputed": reached - resumed,
            "first": first and (first["time"] - event, first["step"], first.get("workers")),
            "past": past and (past["time"] - event, past["step"])}


def controller_events(head_dir: Path, run: str, since: float) -> list[tuple[float, str]]:
    """Ray Train's controller log records of run ``run`` (JSON lines on the head) from ``since``:
    (time.time(), message) of its decisions, worker-group starts and failures."""
    events = []
    for path in head_dir.glob("session_latest/logs/train/ray-train-sys-controller-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = str(record.get("message", ""))
            if record.get("run_name", run) == run and any(e in message for e in CONTROLLER_EVENTS):
                events.append((record_time(record), message.splitlines()[0][:110]))
    return sorted(e for e in events if e[0] >= since)


def record_time(record: dict) -> float:
    if "timestamp_ns" in record:
        return int(record["timestamp_ns"]) / 1e9
    from datetime import datetime

    return datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def attempts(cluster, run: str) -> list[dict]:
    """The run's attempts from Ray Train's state API: start, end, status, workers."""
    try:
        runs = cluster.api("/api/train/v2/runs/v1")["train_runs"]
    except OSError as exc:
        return [{"error": str(exc)}]
    found = sorted((a for r in runs if r["name"] == run for a in r.get("attempts", [])),
                   key=lambda a: a["start_time_ns"])
    return [{"start": a["start_time_ns"] / 1e9, "end": a["end_time_ns"] and a["end_time_ns"] / 1e9,
             "status": a["status"], "workers": len(a["workers"])} for a in found]


def resumed_steps(logs: str, run: str) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed {re.escape(run)} at step (\d+)/", logs)]


def spare(cluster, work: Path, options) -> dict:
    """(i): 3 worker nodes, rank 1's node lost after --kill-at."""
    markers = Path(tempfile.mkdtemp(dir=work))
    job = cluster.submit("train.py", *train_args(work, "spare", options),
                         env_vars=faults(markers, f"pause@{options.kill_at}:1"))
    killed = cluster.kill_node(cluster.node_of_pid(held(markers / f"pause-{options.kill_at}-1", job)), wait=False)
    status, logs, _ = job.wait()
    (work / "spare.log").write_text(logs)
    if status != 0:
        raise SystemExit(f"run spare exited {status}:\n{logs[-3000:]}")
    return {"(i) spare": (killed, options.kill_at, resumed_steps(logs, "spare")[0])}


def shrink_and_grow(cluster, work: Path, options) -> dict:
    """(ii) and (iii): 2 worker nodes and min_workers=1; rank 1's node lost after --kill-at, a node
    added back while the single worker is held after --grow-at."""
    markers = Path(tempfile.mkdtemp(dir=work))
    args = train_args(work, "elastic", options, "--set", "cluster.min_workers=1",
                      "--set", f"cluster.resize_interval_s={options.resize_interval}")
    job = cluster.submit("train.py", *args, env_vars=faults(markers, f"pause@{options.kill_at}:1,"
                                                                      f"pause@{options.grow_at}:0"))
    lost = cluster.node_of_pid(held(markers / f"pause-{options.kill_at}-1", job))
    killed = cluster.kill_node(lost, wait=False)
    held(markers / f"pause-{options.grow_at}-0", job)
    joined = time.time()
    cluster.add_node(lost, wait=False)
    status, logs, _ = job.wait()
    (work / "elastic.log").write_text(logs)
    if status != 0:
        raise SystemExit(f"run elastic exited {status}:\n{logs[-3000:]}")
    resumed = resumed_steps(logs, "elastic")
    return {"(ii) shrink": (killed, options.kill_at, resumed[0]),
            "(iii) grow": (joined, options.grow_at, resumed[1] if len(resumed) > 1 else None)}


def report(cluster, work: Path, events: dict) -> None:
    print(f"\n{'scenario':<12} | {'at step':>7} | {'resumed':>7} | {'recomputed':>10} | "
          f"{'s to first step (step, workers)':<31} | s past the step reached")
    print("-" * 100)
    ray_view = []
    for scenario, (event, reached, resumed) in events.items():
        run = "spare" if "spare" in scenario else "elastic"
        if resumed is None:
            print(f"{scenario:<12} | {reached:>7} | {'-':>7} | {'-':>10} | the group never grew")
            continue
        f = figures(train_points(work, run), event, reached, resumed)
        first = f"{f['first'][0]:.1f} (step {f['first'][1]}, {f['first'][2]})" if f["first"] else "-"
        past = f"{f['past'][0]:.1f} (step {f['past'][1]})" if f["past"] else "-"
        print(f"{scenario:<12} | {reached:>7} | {resumed:>7} | {f['recomputed']:>10} | {first:<31} | {past}")
        ray_view.append((scenario, event, controller_events(cluster.head_dir, run, event - 1), attempts(cluster, run)))
    for scenario, event, logged, tried in ray_view:
        print(f"\n{scenario}: Ray Train's controller, seconds from the {'join' if 'grow' in scenario else 'kill'}")
        for at, message in logged[:12]:
            print(f"  {at - event:+7.1f}  {message}")
        for a in tried:
            if "error" in a:
                print(f"  state API: {a['error']}")
            elif a["end"] is None or a["end"] > event - 1:
                end = f"{a['end'] - event:+.1f}" if a["end"] else "running"
                print(f"  attempt: {a['workers']} workers, started {a['start'] - event:+.1f}, ended {end}, "
                      f"{a['status']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--kill-at", type=int, default=30, help="the step after which a worker's node is lost")
    parser.add_argument("--grow-at", type=int, default=50, help="(iii): the step after which a node joins")
    parser.add_argument("--resize-interval", type=float, default=10.0, help="cluster.resize_interval_s")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="cluster.start_timeout_s")
    options = parser.parse_args()
    cluster_module = support_cluster()
    from support.jobs import write_corpus

    work = Path(tempfile.mkdtemp(prefix="charnn-bench-elastic-"))
    write_corpus(work / "corpus", documents=6, lines=14, seed=5)
    env = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
    cluster = cluster_module.MultiNodeCluster(Path(tempfile.mkdtemp(prefix="charnn-n")), nodes=3, env=env)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {options.steps} steps, a checkpoint "
          f"every {options.checkpoint_every}, worker-group start timeout {options.start_timeout:.0f} s", flush=True)
    started = time.perf_counter()
    try:
        cluster.start()
        events = spare(cluster, work, options)
        cluster.wait_for(dead=set(cluster.worker_ips) - set(cluster.live))  # 2 nodes left for (ii)
        events |= shrink_and_grow(cluster, work, options)
        report(cluster, work, events)
    finally:
        cluster.stop()
    print(f"\n{time.perf_counter() - started:.0f} s in all; runs and job logs (spare.log, elastic.log) under {work}")


if __name__ == "__main__":
    main()
