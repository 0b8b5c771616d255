"""The servers the tests start on 127.0.0.1: moto's S3, a `ray start --head` cluster, and a TCP
proxy that a test takes down to make a storage outage."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from support.env import FAST_TRAIN_ENV, LOOPBACK_ENV, REPO
from support.jobs import last_json


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, and not one this process was given before: the kernel hands
    the same ephemeral port to binds in a row now and then (35 times in 1,000 here), and a
    `ray start` given it twice (as its client server's and its metrics' port) fails."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class MotoServer:
    """moto's S3 server on 127.0.0.1 (conditional writes made atomic: atomic_moto.py), started and
    stopped by the tests."""

    def __init__(self, env: dict | None = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc = None

    def start(self) -> "MotoServer":
        server = Path(__file__).with_name("atomic_moto.py")
        self.proc = subprocess.Popen([sys.executable, str(server), str(self.port)], env=self.env,
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
        # Ports of its own: `make test` runs two of these clusters at once (one per pytest worker),
        # beside embedded Rays, and the default agent port (52365) is one per machine; a head whose
        # dashboard agent cannot bind it dies.
        ports = [f"--{name}-port={free_port()}" for name in (
            "dashboard-agent-listen", "dashboard-agent-grpc", "ray-client-server", "runtime-env-agent", "metrics-export")]
        subprocess.run([self.ray, "start", "--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", *ports, "--num-cpus=2",
                        "--disable-usage-stats", f"--temp-dir={self.temp_dir}"],
                       env=self.env, check=True, capture_output=True, timeout=180)
        return self

    def stop(self) -> None:
        """Stop this cluster's processes only (``ray stop`` would stop every Ray on the machine,
        the other tests' embedded ones included): those naming its temp dir or GCS port, and
        their descendants."""
        end_processes(own_processes(str(self.temp_dir), f"127.0.0.1:{self.gcs_port}"), 15)

    @property
    def driver_env(self) -> dict:
        """What a process needs to join this cluster as a driver (a plain ``ray.init()``)."""
        return {"RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}", "RAY_AUTH_MODE": "token"}

    def job_command(self, submission_id: str, script: str, *args: str, wait: bool = True) -> list[str]:
        return [self.ray, "job", "submit", "--address", self.address, "--submission-id", submission_id,
                "--working-dir", str(REPO), *([] if wait else ["--no-wait"]), "--", "python", f"jobs/{script}", *args]

    def submit(self, script: str, *args: str, timeout: int = 600) -> tuple[int, str, dict | None]:
        """Submit and wait; returns (the CLI's exit status, the job's own log, its last JSON line)."""
        submission_id = f"charnn-test-{uuid.uuid4().hex[:10]}"
        proc = subprocess.run(self.job_command(submission_id, script, *args), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        logs = self.logs(submission_id)
        return proc.returncode, logs, last_json(logs)

    def logs(self, submission_id: str) -> str:
        return subprocess.run([self.ray, "job", "logs", "--address", self.address, submission_id],
                              env=self.env, capture_output=True, text=True, timeout=60).stdout


def end_processes(processes: list[int], grace_s: float) -> None:
    """SIGTERM ``processes``, and SIGKILL those still there ``grace_s`` later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while processes and time.monotonic() < deadline:
            processes = [p for p in processes if os.path.exists(f"/proc/{p}")]
            time.sleep(0.2)


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


class FlakyProxy:
    """A TCP forwarder from a port of its own to ``target_port``, both on 127.0.0.1, that a test
    takes down (new connections refused, open ones cut) and brings back: a storage outage."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self.live = threading.Event()
        self.connections: set = set()

    def up(self) -> "FlakyProxy":
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
