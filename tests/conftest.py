"""Shared fixtures: a loopback-only environment, generated corpora, a real local Ray."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LOOPBACK_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "AWS_EC2_METADATA_DISABLED": "true", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
# Ray Train's controller polls its workers every 2 s; the tests' runs are seconds long, so they
# spend much of their time waiting on that poll.  Ray Train propagates this to its actors.
FAST_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
os.environ.update(LOOPBACK_ENV)

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows "
         "of outrageous fortune take arms against a sea troubles").split()


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


@pytest.fixture
def corpus(tmp_path) -> Path:
    directory = tmp_path / "corpus"
    write_corpus(directory, documents=8, lines=120)
    return directory


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for in-process pipeline tests, shut down with the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def run_job(script: str, *args: str, env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run an entry point as a user would; returns (completed process, parsed last JSON line or None)."""
    full_env = {**os.environ, **LOOPBACK_ENV, **FAST_TRAIN_ENV, **(env or {})}
    full_env.pop("RAY_ADDRESS", None) if env is None or "RAY_ADDRESS" not in env else None
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines and lines[-1].startswith("{") else None
    return proc, result


# Fake credentials for moto; set before any Ray worker starts so workers inherit them.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server on 127.0.0.1, started and stopped by the tests."""

    def __init__(self, env: dict | None = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc = None

    def start(self) -> "MotoServer":
        import time
        import urllib.request

        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(100):
            try:
                opener.open(self.endpoint + "/moto-api/", timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def upload_dir(self, bucket: str, prefix: str, directory: Path) -> str:
        client = self.client()
        for path in sorted(directory.iterdir()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3, request) -> str:
    name = "charnn-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    moto_s3.client().create_bucket(Bucket=name)
    return name


class RayCluster:
    """A `ray start --head` cluster on 127.0.0.1; jobs go through `ray job submit`, as users send them."""

    def __init__(self, temp_dir: Path):
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        # Jobs run the `python` on the PATH of whoever ran `ray start`: this interpreter's.
        self.env = {**os.environ, **LOOPBACK_ENV, **FAST_TRAIN_ENV, "RAY_AUTH_MODE": "token", "RAY_DEDUP_LOGS": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = temp_dir

    def start(self) -> "RayCluster":
        self.gcs_port = free_port()
        subprocess.run([self.ray, "start", "--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", "--num-cpus=2",
                        "--disable-usage-stats", f"--temp-dir={self.temp_dir}"],
                       env=self.env, check=True, capture_output=True, timeout=180)
        return self

    def stop(self) -> None:
        """Stop this cluster's processes only (``ray stop`` would stop every Ray on the machine,
        the other tests' embedded ones included): those naming its temp dir or GCS port, and
        their descendants."""
        import signal
        import time

        processes = own_processes(str(self.temp_dir), f"127.0.0.1:{self.gcs_port}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in processes:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while processes and time.monotonic() < deadline:
                processes = [p for p in processes if os.path.exists(f"/proc/{p}")]
                time.sleep(0.2)

    def job_command(self, submission_id: str, script: str, *args: str, wait: bool = True) -> list[str]:
        return [self.ray, "job", "submit", "--address", self.address, "--submission-id", submission_id,
                "--working-dir", str(REPO), *([] if wait else ["--no-wait"]), "--", "python", f"jobs/{script}", *args]

    def submit(self, script: str, *args: str, timeout: int = 600) -> tuple[int, str, dict | None]:
        """Submit and wait; returns (the CLI's exit status, the job's own log, its last JSON line)."""
        import uuid

        submission_id = f"charnn-test-{uuid.uuid4().hex[:10]}"
        proc = subprocess.run(self.job_command(submission_id, script, *args), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        logs = self.logs(submission_id)
        return proc.returncode, logs, last_json(logs)

    def logs(self, submission_id: str) -> str:
        return subprocess.run([self.ray, "job", "logs", "--address", self.address, submission_id],
                              env=self.env, capture_output=True, text=True, timeout=60).stdout


def own_processes(*marks: str) -> list[int]:
    """PIDs of the processes whose command line holds one of ``marks``, and of their descendants."""
    parents, matched = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if any(mark in command for mark in marks):
            matched.add(int(entry))
    found, grew = set(matched), True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found - {os.getpid()})


def last_json(text: str) -> dict | None:
    lines = [line for line in text.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray")).start()
    yield cluster
    cluster.stop()


SMOKE_ROWS = 8


def train_smoke(root: Path, name: str, workers: int, steps: int, *extra: str, env: dict | None = None,
                check: bool = True):
    """jobs/train.py on the smoke model over ``root/corpus``: dropout 0, the global loss logged every
    step, no checkpoints or validation unless ``extra`` asks for them."""
    return run_job(
        "train.py", "--spec", "jobs/specs/smoke.yaml",
        "--set", f"data.sources=[{root / 'corpus'}]", "--set", f"data.dataset_root={root / 'datasets'}",
        "--set", f"run.storage={root / 'runs'}", "--set", f"run.name={name}",
        "--set", f"cluster.num_workers={workers}", "--set", f"train.batch_per_worker={SMOKE_ROWS // workers}",
        "--set", f"train.steps={steps}", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0",
        "--set", "train.validate_every=0", "--set", "model.dropout=0.0", *extra, env=env, check=check,
    )


def tb_losses(root: Path, name: str) -> dict[int, float]:
    """The train loss curve that a run wrote to TensorBoard, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "runs" / name / "tensorboard")).Reload().Scalars("train/loss")
    return {e.step: e.value for e in events}


class FlakyProxy:
    """A TCP forwarder from a port of its own to ``target_port``, both on 127.0.0.1, that a test
    takes down (new connections refused, open ones cut) and brings back: a storage outage."""

    def __init__(self, target_port: int):
        import threading

        self.port, self.target = free_port(), target_port
        self.live = threading.Event()
        self.connections: set = set()

    def up(self) -> "FlakyProxy":
        import socket
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.settimeout(0.1)
        self.live.set()
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def down(self) -> None:
        self.live.clear()
        for connection in list(self.connections):
            connection.close()
        self.connections.clear()

    def _accept(self, server) -> None:
        import socket
        import threading

        with server:
            while self.live.is_set():
                try:
                    client, _ = server.accept()
                except socket.timeout:
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target))
                except OSError:
                    client.close()
                    continue
                self.connections |= {client, upstream}
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()


FAULT_REPORT: list[dict] = []


def pytest_runtest_logreport(report):
    """Collect the fault tests' rows, which each test records as its "fault" property."""
    if report.when == "call":
        FAULT_REPORT.extend(value for name, value in report.user_properties if name == "fault")


def pytest_terminal_summary(terminalreporter):
    """`pytest -m faults` ends with one table of what was injected and what it cost."""
    if not FAULT_REPORT:
        return
    columns = ("fault", "injected", "recoveries", "steps recomputed", "final loss vs uninterrupted")
    rows = [[str(r[c]) for c in columns] for r in FAULT_REPORT]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    terminalreporter.section("fault injection")
    for row in [list(columns), ["-" * w for w in widths], *rows]:
        terminalreporter.write_line(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """Runs of the smoke model over short documents: 24 steps an epoch, so 30 steps cross an epoch boundary."""
    root = tmp_path_factory.mktemp("smoke")
    write_corpus(root / "corpus", documents=6, lines=14, seed=5)
    return root


@pytest.fixture(scope="session")
def two_workers(smoke_root) -> dict:
    """The uninterrupted reference: 2 workers x 4 rows, 30 steps (run "two-workers")."""
    _, result = train_smoke(smoke_root, "two-workers", 2, 30)
    return result
