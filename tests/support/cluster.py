"""A multi-node Ray cluster on this one machine: a head on 127.0.0.2 (no CPUs: the driver, Ray
Train's controller; its dashboard on 127.0.0.1) and worker nodes on 127.0.0.3, .4, ... (the whole of
127/8 is loopback), each a `ray start` of its own with its own temp dir and ports, so that a test
can kill one node's processes, and only those, as a lost machine, and add a node back.

loopback.env's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray refuse every node but the first:
this cluster's processes and the jobs it runs have it unset.  Every other byte stays on
loopback (NO_PROXY lists 127.0.0.1-127.0.0.5)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from support.env import FAST_TRAIN_ENV, LOOPBACK_ENV, REPO
from support.jobs import last_json
from support.servers import end_processes, free_port, own_processes

# The head's address.  Not 127.0.0.1, which Ray takes for "this machine": with clusters enabled it
# puts the machine's network address in its place (a head started on it registers as, say,
# 192.0.2.2, and a node joining "127.0.0.1:PORT" dials that); with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# the head keeps 127.0.0.1 but its GCS listens there alone, while `ray start` refuses to add a
# node, and a worker process elsewhere reads "127.0.0.1" as its own node's address.  Ray takes any
# other loopback address as given.
HEAD_IP = "127.0.0.2"
# A lost node is seen by its missed health checks: 1 s apart, dead after 3 misses (Ray's defaults,
# 3 s and 5, would leave a dead node alive for 15 s of a seconds-long test run).
HEALTH_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "3"}


def cluster_env() -> dict:
    """The environment of the cluster's processes, of the jobs it runs, and of the CLI that talks to it."""
    env = {**os.environ, **LOOPBACK_ENV, **FAST_TRAIN_ENV, **HEALTH_ENV, "RAY_AUTH_MODE": "token",
           "RAY_DEDUP_LOGS": "0", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for key in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)
    return env


class MultiNodeCluster:
    """``nodes`` worker nodes of ``cpus_per_node`` CPUs each beside a head of none; every node's
    temp dir is a short one under ``temp_root`` (Ray's socket paths stay under 108 bytes).  ``env``
    adds to the environment of its processes and jobs (Ray's own settings, say)."""

    def __init__(self, temp_root: Path, nodes: int = 3, cpus_per_node: int = 1, env: dict | None = None):
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.temp_root, self.cpus_per_node = Path(temp_root), cpus_per_node
        self.env = {**cluster_env(), **(env or {})}
        self.dashboard, self.gcs_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.worker_ips = [f"127.0.0.{3 + i}" for i in range(nodes)]
        self.live: list[str] = []  # the worker nodes started and not killed, oldest first
        self._dirs: dict[str, Path] = {}  # each worker node's temp dir now

    def node_dir(self, ip: str) -> Path:
        """A node's temp dir: fixed-width names, so that no node's is a prefix of another's."""
        return self.temp_root / f"n{int(ip.rsplit('.', 1)[1]):03d}"

    @property
    def head_dir(self) -> Path:
        return self.node_dir(HEAD_IP)

    @staticmethod
    def _agent_ports() -> list[str]:
        """Ports of a node's own: other Rays run on this machine, and an agent that cannot bind its port dies."""
        return [f"--{name}-port={free_port()}" for name in (
            "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export",
            "node-manager", "object-manager")]

    def start(self) -> "MultiNodeCluster":
        head = self.head_dir
        head.mkdir(parents=True, exist_ok=True)
        self._ray_start("--head", f"--port={self.gcs_port}", f"--node-ip-address={HEAD_IP}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                        f"--ray-client-server-port={free_port()}", *self._agent_ports(), "--num-cpus=0",
                        f"--temp-dir={head}")
        for ip in self.worker_ips:
            self.add_node(ip, wait=False)
        self.wait_for(alive=set(self.worker_ips))
        return self

    def _ray_start(self, *args: str) -> None:
        proc = subprocess.run([self.ray, "start", "--disable-usage-stats", *args], env=self.env,
                              capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise RuntimeError(f"ray start {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")

    def add_node(self, ip: str, wait: bool = True) -> None:
        """Start a worker node on ``ip`` (a node killed before comes back with a fresh temp dir)."""
        directory = self.node_dir(ip)
        if directory.exists():
            directory = directory.with_name(f"{directory.name}-{uuid.uuid4().hex[:4]}")
        directory.mkdir(parents=True)
        self._dirs[ip] = directory
        self._ray_start(f"--address={HEAD_IP}:{self.gcs_port}", f"--node-ip-address={ip}",
                        f"--num-cpus={self.cpus_per_node}", *self._agent_ports(), f"--temp-dir={directory}")
        self.live.append(ip)
        if wait:
            self.wait_for(alive={ip})

    def node_processes(self, ip: str) -> list[int]:
        """The pids of a worker node: its raylet, agents, log monitor and workers, and their descendants."""
        return own_processes(f"{self._dirs[ip]}/")

    def kill_node(self, ip: str, wait: bool = True) -> float:
        """SIGKILL every process of the node on ``ip`` at once, as a lost machine; returns the
        time.time() of the kill.  With ``wait``, return once Ray has marked the node dead.  Unlike a
        machine that vanishes, the kernel closes the killed processes' connections: their peers (the
        other workers' gloo) fail at once, before Ray has marked the node dead."""
        processes = self.node_processes(ip)
        assert processes, f"node {ip} has no processes"
        killed_at = time.time()
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.live.remove(ip)
        if wait:
            self.wait_for(dead={ip})
        return killed_at

    def node_of_pid(self, pid: int) -> str | None:
        """The worker node whose process tree holds ``pid`` (None: the head's or none)."""
        return next((ip for ip in self.live if pid in self.node_processes(ip)), None)

    def api(self, path: str) -> dict:
        """GET ``path`` of the head's dashboard (the jobs and state APIs), with the cluster's token."""
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as reply:
            return json.loads(reply.read())

    def nodes(self) -> list[tuple[str, str]]:
        """(ip, "ALIVE" or "DEAD") of every node Ray knows, from its state API."""
        return [(n["node_ip"], n["state"]) for n in self.api("/api/v0/nodes?limit=1000")["data"]["result"]["result"]]

    def wait_for(self, alive: set[str] = frozenset(), dead: set[str] = frozenset(), seconds: float = 120) -> None:
        """Wait until Ray has every ip of ``alive`` as a live node and none of ``dead``."""
        deadline = time.monotonic() + seconds
        while True:
            nodes = self.nodes()
            up = {ip for ip, state in nodes if state == "ALIVE"}
            if alive <= up and not dead & up:
                return
            assert time.monotonic() < deadline, f"waiting for alive {alive}, dead {dead}: {nodes}"
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop this cluster's processes only (never `ray stop`: other Rays run on this machine):
        SIGTERM, and SIGKILL for what still runs 3 s later."""
        end_processes(own_processes(str(self.temp_root), f"{HEAD_IP}:{self.gcs_port}"), 3)
        shutil.rmtree(self.temp_root, ignore_errors=True)

    @property
    def driver_env(self) -> dict:
        """What a process needs to join this cluster as a driver (a plain ``ray.init()``)."""
        return {"RAY_ADDRESS": f"{HEAD_IP}:{self.gcs_port}", "RAY_AUTH_MODE": "token"}

    def job_command(self, submission_id: str, script: str, *args: str, env_vars: dict | None = None,
                    wait: bool = True) -> list[str]:
        """`ray job submit` of ``jobs/<script>``, its runtime env's variables ``env_vars`` (which reach
        the driver and, through charnn, its workers)."""
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        return [self.ray, "job", "submit", "--address", self.address, "--submission-id", submission_id,
                "--working-dir", str(REPO), *runtime_env, *([] if wait else ["--no-wait"]),
                "--", "python", f"jobs/{script}", *args]

    def submit(self, script: str, *args: str, env_vars: dict | None = None, timeout: int = 600) -> "Job":
        """Submit ``jobs/<script>`` without waiting; a Job to wait for."""
        submission_id = f"charnn-mn-{uuid.uuid4().hex[:10]}"
        subprocess.run(self.job_command(submission_id, script, *args, env_vars=env_vars, wait=False),
                       env=self.env, check=True, capture_output=True, text=True, timeout=120)
        return Job(self, submission_id, timeout)

    def run(self, script: str, *args: str, env_vars: dict | None = None, timeout: int = 600):
        """Submit and wait; (its driver's exit status, its log, its last JSON line)."""
        return self.submit(script, *args, env_vars=env_vars, timeout=timeout).wait()

class Job:
    """A submitted job: its state, its log, and its end."""

    def __init__(self, cluster: MultiNodeCluster, submission_id: str, timeout: float):
        self.cluster, self.id = cluster, submission_id
        self.deadline = time.monotonic() + timeout

    def info(self) -> dict:
        """The jobs API's record of the job: "status", "driver_exit_code", "message", ..."""
        return self.cluster.api(f"/api/jobs/{self.id}")

    def logs(self) -> str:
        return self.cluster.api(f"/api/jobs/{self.id}/logs")["logs"]

    def wait(self) -> tuple[int | None, str, dict | None]:
        """Wait for the job's end; (its driver's exit status, its log, its last JSON line)."""
        while (info := self.info())["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < self.deadline, f"job {self.id} is still {info['status']}:\n{self.logs()[-3000:]}"
            time.sleep(0.5)
        logs = self.logs()
        return info.get("driver_exit_code"), logs, last_json(logs)
