"""Fixed cost of a training job: a 1-step smoke run of jobs/train.py, its stages apart.

    .venv/bin/python bench/fixed_cost.py [--rounds 2] [--set KEY=VALUE ...] [--env KEY=VALUE ...]
                                         [--profile DIR] [--keep]

Each round runs ``jobs/train.py --spec jobs/specs/smoke.yaml --set train.steps=1`` (validation and a
checkpoint at that step, as every run ends) in a fresh temporary storage on its own embedded Ray,
under the loopback environment (loopback.env), and prints how long each stage took: from the
interpreter's start to its exit, through ray.init, the dataset build, Ray Train's controller and
worker group, the Trainer's set-up in the workers, the first step, validation and checkpoint, and
the teardown.  ``--set`` adds settings to the job's command line (and so can change the run),
``--env`` variables to its environment (Ray's own settings, to measure what one of them saves).

The job runs unchanged; this script runs it through a probe (this file with ``--probe``) that
wraps the driver's stages and the workers' training function with wall-clock marks, because the
stages a user waits for are not all in the job's own output.  Ray Train's controller stages come
from its log in the Ray session directory.  ``--profile DIR`` also writes a cProfile of each
worker's training function there (the Trainer's set-up is most of it in a 1-step run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTROLLER_MARKS = {  # Ray Train's controller log (2.60): the message that starts a stage
    "Requesting resources": "controller.ready",
    "Attempting to start training worker group": "group.requested",
    "Started training worker group": "group.started",
}


def mark(path: str, stage: str, **extra) -> None:
    """Append one stage's wall-clock time to the marks file (every process of the job appends)."""
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage, "t": time.time(), "pid": os.getpid(), **extra}) + "\n")


def timed(path: str, stage: str, function):
    """``function`` with a mark at its start and at its end (also when it raises)."""
    def wrapper(*args, **kwargs):
        mark(path, f"{stage}.start")
        try:
            return function(*args, **kwargs)
        finally:
            mark(path, f"{stage}.end")
    return wrapper


def wrap_attribute(path: str, owner, name: str, stage: str) -> None:
    """Time ``owner.name`` where it exists (another version of the code may have moved it)."""
    if hasattr(owner, name):
        setattr(owner, name, timed(path, stage, getattr(owner, name)))


def worker_loop(path: str, loop, profile_dir: str | None):
    """The workers' training function ``loop``, marked where a worker enters it, where its Trainer
    is ready (set up, resumed), where its first step ends and where it returns.  Defined here, it
    is pickled by value and so runs in Ray Train's workers unchanged."""
    def train_loop(config):
        mark(path, "worker.entered")
        from charnn.train import context, trainer

        for name in ("load_manifest", "make_optimizer", "Checkpointer"):
            wrap_attribute(path, trainer, name, f"setup.{name}")
        for name, stage in (("_model", "setup.model"), ("_start", "setup.resume"), ("train_step", "step")):
            wrap_attribute(path, trainer.Trainer, name, stage)
        wrap_attribute(path, context.RayContext, "wrap", "setup.wrap")
        if not profile_dir:
            loop(config)
        else:
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(loop, config)
            profiler.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
        mark(path, "worker.done")
    return train_loop


def probe(path: str, profile_dir: str | None, job_args: list[str]) -> None:
    """Run jobs/train.py's main() in this process with its stages marked."""
    mark(path, "probe.start")
    import atexit

    atexit.register(mark, path, "atexit.last")  # handlers run last-in first-out: this one ends them
    import charnn.cli.train as job

    mark(path, "imports.end")
    from charnn.cli import runtime
    from charnn.train import launch

    init_ray = job.init_ray

    def init_and_note_session(*args, **kwargs):
        embedded = init_ray(*args, **kwargs)
        import ray

        mark(path, "session", dir=ray._private.worker.global_worker.node.get_session_dir_path())
        return embedded

    job.init_ray = timed(path, "ray.init", init_and_note_session)
    for name, stage in (("build_dataset", "dataset"), ("fit", "fit"), ("_report", "report")):
        wrap_attribute(path, job, name, stage)
    wrap_attribute(path, runtime, "_stop_ray", "shutdown")
    launch.train_loop_per_worker = worker_loop(path, launch.train_loop_per_worker, profile_dir)
    sys.argv = [str(REPO / "jobs" / "train.py"), *job_args]
    try:
        job.main()
    finally:
        mark(path, "main.end")
        atexit.register(mark, path, "atexit.first")  # after the wait for non-daemon threads


def controller_marks(session_dir: str) -> list[dict]:
    """The controller's stages from Ray Train's controller log (JSON lines with timestamp_ns)."""
    marks = []
    for log in sorted(Path(session_dir, "logs", "train").glob("ray-train-sys-controller-*.log")):
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            t = record.get("timestamp_ns", 0) / 1e9
            if not marks:
                marks.append({"stage": "controller.started", "t": t})
            marks += [{"stage": stage, "t": t} for text, stage in CONTROLLER_MARKS.items()
                      if record.get("message", "").startswith(text)]
    return marks


def first(marks: list[dict], stage: str, last: bool = False) -> float | None:
    """The earliest (or latest) time of ``stage`` among the marks."""
    times = [m["t"] for m in marks if m["stage"] == stage]
    return (max(times) if last else min(times)) if times else None


def worker_seconds(marks: list[dict], stage: str) -> float | None:
    """Seconds inside ``stage`` on the slowest worker (start and end marks of the same process)."""
    spent: dict[int, float] = {}
    starts: dict[int, float] = {}
    for m in marks:
        if m["stage"] == f"{stage}.start":
            starts[m["pid"]] = m["t"]
        elif m["stage"] == f"{stage}.end" and m["pid"] in starts:
            spent[m["pid"]] = spent.get(m["pid"], 0.0) + m["t"] - starts.pop(m["pid"])
    return max(spent.values()) if spent else None


STAGES = (  # (label, from, to): the first mark of each, "!" for the last (the slowest worker)
    ("python start to the probe's first line", "launch", "probe.start"),
    ("imports (charnn.cli.train: ray, ray.train, torch, ...)", "probe.start", "imports.end"),
    ("spec, checkpoint lookup", "imports.end", "ray.init.start"),
    ("ray.init (embedded)", "ray.init.start", "ray.init.end"),
    ("cluster check, lease, dataset build, spec", "ray.init.end", "fit.start"),
    ("  of which dataset build", "dataset.start", "dataset.end"),
    ("fit() to the controller's first log line", "fit.start", "controller.started"),
    ("controller set-up (until it requests resources)", "controller.started", "controller.ready"),
    ("controller ready to the worker group requested", "controller.ready", "group.requested"),
    ("worker group start (actors, process group)", "group.requested", "worker.entered"),
    ("Trainer set-up in the workers", "worker.entered", "step.start!"),
    ("first step", "step.start!", "step.end!"),
    ("validation, checkpoint, report (workers)", "step.end!", "worker.done!"),
    ("workers done to fit() returning", "worker.done!", "fit.end"),
    ("load checkpoint, sample", "report.start", "report.end"),
    ("result to ray.shutdown", "report.end", "shutdown.start"),
    ("ray.shutdown", "shutdown.start", "shutdown.end"),
    ("main() returning to interpreter exit", "main.end", "exit"),
    ("  of which waiting for threads", "main.end", "atexit.first"),
    ("  of which atexit handlers", "atexit.first", "atexit.last"),
    ("  of which interpreter teardown", "atexit.last", "exit"),
)
SETUP_PARTS = ("setup.load_manifest", "setup.model", "setup.make_optimizer", "setup.wrap", "setup.Checkpointer",
               "setup.resume")


def stage_table(marks: list[dict]) -> dict[str, float | None]:
    """Seconds of each stage (None where a mark is missing), the Trainer's set-up parts and the total."""
    def at(stage: str) -> float | None:
        return first(marks, stage.rstrip("!"), last=stage.endswith("!"))

    table = {}
    for label, start, end in STAGES:
        a, b = at(start), at(end)
        table[label] = None if a is None or b is None else b - a
    for part in SETUP_PARTS:
        table[f"  Trainer set-up: {part.split('.', 1)[1]} (slowest worker)"] = worker_seconds(marks, part)
    launch, exit_, step = at("launch"), at("exit"), at("step.end!")
    table["launch to the first step done"] = None if step is None else step - launch
    table["whole command"] = exit_ - launch
    return table


def run_round(work: Path, extra: list[str], job_env: dict[str, str],
              profile_dir: str | None) -> dict[str, float | None]:
    """One job in a fresh storage under ``work``, with ``job_env`` added to its environment; its stage table."""
    marks_file = work / "marks.jsonl"
    env = {**os.environ, **loopback_env(), **job_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))  # this tree's charnn
    env.pop("RAY_ADDRESS", None)
    job_args = ["--spec", "jobs/specs/smoke.yaml", "--set", "train.steps=1", "--set", f"run.storage={work / 'runs'}",
                "--set", f"data.dataset_root={work / 'datasets'}", "--set", "run.name=fixed-cost", *extra]
    profile = ["--profile", profile_dir] if profile_dir else []
    command = [sys.executable, __file__, "--probe", str(marks_file), *profile, "--", *job_args]
    launch = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    (work / "stdout").write_text(proc.stdout)
    (work / "stderr").write_text(proc.stderr)
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    if proc.returncode != 0 or not last[0].startswith("{"):
        raise SystemExit(f"the job exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    marks = [json.loads(line) for line in marks_file.read_text().splitlines()]
    session = next((m["dir"] for m in marks if m["stage"] == "session"), None)
    marks += controller_marks(session) if session else []
    return stage_table([{"stage": "launch", "t": launch}, {"stage": "exit", "t": ended}, *marks])


def loopback_env() -> dict[str, str]:
    """loopback.env's KEY=VALUE lines: every byte of the job stays on 127.0.0.1."""
    lines = (REPO / "loopback.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def print_table(rounds: list[dict[str, float | None]]) -> None:
    print(f"{'stage':<58} {'median':>7}  rounds")
    for label in rounds[0]:
        values = [r[label] for r in rounds if r[label] is not None]
        median = f"{statistics.median(values):7.2f}" if values else "      -"
        print(f"{label:<58} {median}  " + " ".join(f"{v:.2f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more job setting")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="one more environment variable for the job")
    parser.add_argument("--profile", metavar="DIR", help="write a cProfile of each worker's training function here")
    parser.add_argument("--keep", action="store_true", help="keep each round's storage, output and marks")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args, job_args = parser.parse_known_args()
    if args.probe:
        return probe(args.probe, args.profile, [a for a in job_args if a != "--"])
    load = os.getloadavg()
    rounds = []
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="charnn-fixed-cost-"))
        job_env = dict(pair.split("=", 1) for pair in args.env)
        rounds.append(run_round(work, [a for s in args.set for a in ("--set", s)], job_env, args.profile))
        if args.keep:
            print(f"round {len(rounds)}: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"jobs/train.py, smoke spec, 1 step, embedded Ray; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print_table(rounds)


if __name__ == "__main__":
    main()
