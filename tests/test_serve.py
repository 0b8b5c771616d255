"""The published model served with Ray Serve (issue 24), as a user serves it: ``python -m
charnn.cli.serve`` in a subprocess on its own embedded Ray, spoken to over HTTP on 127.0.0.1.

One deployment for the module.  The tests that change what it serves run last, in file order: the
hot reload (v0002, then a version that cannot be loaded), a replica killed under load, and SIGTERM.
The model is a random CharGRU 64 x 2 whose "unknown" code never wins (a head bias of -50): a
gorner98 "unknown" code is sampled like any other but decodes to nothing, so only then is a
request's ``length`` its number of characters."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from charnn.model import CharGRU, ModelShape
from charnn.registry import DatasetInfo, ModelRegistry, VersionInfo
from charnn.storage import Store
from support.env import LOOPBACK_ENV, REPO
from support.servers import end_processes, free_port

pytestmark = pytest.mark.ray

MODEL, POLL_S, MAX_LENGTH = "demo", 1.0, 4000
REPLICA_MARK = "ServeReplica:charnn:ModelServer"  # the replica's process title
RELOAD_MARGIN_S = 20.0  # a busy 2-core machine loads the new version within poll_s plus this


def write_checkpoint(root: Path, seed: int) -> str:
    """A charnn.checkpoint/1 of a random CharGRU 64 x 2 that never samples the unknown code."""
    torch.manual_seed(seed)
    model = CharGRU(ModelShape(98, 64, 2))
    with torch.no_grad():
        model.head.bias[0] = -50.0
    directory = root / f"ckpt-{seed}"
    directory.mkdir()
    torch.save({"format": "charnn.checkpoint/1", "model": model.state_dict(), "shape": model.shape.to_dict(),
                "alphabet": "gorner98"}, directory / "model.pt")
    return str(directory)


def publish(root: Path, checkpoint_url: str) -> str:
    """Publish a checkpoint as the model's next version, over the one published now."""
    registry = ModelRegistry(str(root / "runs" / "models" / MODEL), Store())
    with registry.lease(60) as lease:
        info = VersionInfo(metrics={"val_loss": 4.0}, dataset=DatasetInfo(sources=[]))
        return registry.publish(checkpoint_url, info, lease, replaces=registry.published()).name


def user_env(**extra: str) -> dict:
    """A user's environment on this machine: loopback only, no RAY_ADDRESS (an embedded Ray)."""
    env = {**os.environ, **LOOPBACK_ENV, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def descendants(pid: int) -> list[int]:
    """``pid``'s processes below it, at any depth."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    found, grew = {pid}, True
    while grew:
        children = {p for p, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found - {pid})


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    reads: int  # non-empty reads of the body
    first_s: float  # request sent to the first byte of the body
    total_s: float  # request sent to the end of the body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


def read_reply(response: http.client.HTTPResponse, started: float) -> Reply:
    pieces, first = [], None
    while piece := response.read1(65536):
        first = time.monotonic() - started if first is None else first
        pieces.append(piece)
    total = time.monotonic() - started
    return Reply(response.status, response.headers, b"".join(pieces), len(pieces), first or total, total)


def call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        return read_reply(connection.getresponse(), started)
    finally:
        connection.close()


def generate(port: int, timeout: float = 60, **options) -> Reply:
    return call(port, "POST", "/generate", json.dumps(options).encode(), timeout)


class Streaming(threading.Thread):
    """One /generate request in a thread: ``headers`` is set once the response has begun; then
    ``reply`` or ``error`` (an exception, a broken chunked stream) once it has ended."""

    def __init__(self, port: int, timeout: float = 60, **options):
        super().__init__(daemon=True)
        self.port, self.timeout, self.options = port, timeout, options
        self.headers, self.reply, self.error = threading.Event(), None, None
        self.began_at = self.ended_at = None
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def run(self) -> None:
        try:
            started = time.monotonic()
            self.connection.request("POST", "/generate", json.dumps(self.options).encode(),
                                    {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            self.began_at = time.monotonic()
            self.headers.set()
            self.reply = read_reply(response, started)
        except Exception as exc:  # noqa: BLE001 - what the client saw
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.headers.set()
            self.connection.close()

    def hang_up(self) -> None:
        """Leave, as a client that goes away does (the thread then ends with an error)."""
        sock = self.connection.sock
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


class Server:
    """``python -m charnn.cli.serve`` in a subprocess, its output in a log file."""

    def __init__(self, root: Path):
        self.root, self.port, self.log_path = root, free_port(), root / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 150) -> "Server":
        command = [sys.executable, "-m", "charnn.cli.serve", "--model", MODEL, "--storage", str(self.root / "runs"),
                   "--port", str(self.port), "--poll-s", str(POLL_S), "--max-length", str(MAX_LENGTH)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=user_env(), cwd=REPO)
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until GET /healthz answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            assert self.process.poll() is None, f"the server exited {self.process.returncode}:\n{self.log()[-3000:]}"
            try:
                if call(self.port, "GET", "/healthz", timeout=5).status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"no healthy server within {timeout_s} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def replicas(self) -> list[int]:
        return [pid for pid in descendants(self.process.pid) if REPLICA_MARK in command_line(pid)]

    def version(self) -> str:
        return call(self.port, "GET", "/model", timeout=10).json()["version"]

    def wait_version(self, name: str, timeout_s: float) -> float:
        """Seconds until GET /model names ``name``."""
        started = time.monotonic()
        while (seen := self.version()) != name:
            assert time.monotonic() - started < timeout_s, f"/model still names {seen} after {timeout_s} s"
            time.sleep(0.1)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    publish(root, write_checkpoint(root, 1))
    return root


@pytest.fixture(scope="module")
def server(root):
    server = Server(root)
    try:
        yield server.start()
    finally:
        if server.process is not None:
            left = descendants(server.process.pid)
            end_processes([server.process.pid], 30)
            end_processes([p for p in left if os.path.exists(f"/proc/{p}")], 10)


def test_a_model_with_nothing_published_is_one_line_and_exit_2_before_ray_starts(tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "charnn.cli.serve", "--model", "nothing", "--storage",
                           str(tmp_path / "runs"), "--port", str(free_port())], capture_output=True, text=True,
                          env=user_env(RAY_TMPDIR=str(ray_tmp)), cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charnn: error: model 'nothing' has no published version"), lines
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(ray_tmp.iterdir()) == []  # no Ray session was started
    assert time.monotonic() - started < 30


def test_generate_streams_text_while_it_is_sampled(server):
    reply = generate(server.port, prime="ROMEO.", length=400, seed=1)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.headers["Transfer-Encoding"] == "chunked" and reply.headers["X-Charnn-Version"] == "v0001"
    assert len(reply.text) == 400
    assert reply.reads > 1 and reply.first_s < reply.total_s, (reply.reads, reply.first_s, reply.total_s)


def test_health_and_model_describe_the_version_served(server):
    assert call(server.port, "GET", "/healthz").json() == {"ok": True, "version": "v0001"}
    described = call(server.port, "GET", "/model").json()
    assert (described["model"], described["version"], described["val_loss"]) == (MODEL, "v0001", 4.0)
    missing = call(server.port, "GET", "/nothing")
    assert missing.status == 404 and "POST /generate" in missing.json()["error"]


def test_a_seed_repeats_its_text_and_another_seed_does_not(server):
    options = {"prime": "ROMEO.", "length": 300, "temperature": 0.9, "seed": 5}
    first, again = generate(server.port, **options), generate(server.port, **options)
    other = generate(server.port, **{**options, "seed": 6})
    assert first.status == again.status == other.status == 200
    assert first.text == again.text and len(first.text) == 300
    assert other.text != first.text


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_k": 5, "temperature": 0.8, "seed": 11}],
                         ids=["greedy", "seeded"])
def test_text_is_the_text_of_generate_py(server, options):
    request = {"prime": "JULIET. O Romeo", "length": 300, **options}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in request.items()]
    proc = subprocess.run([sys.executable, "jobs/generate.py", "--model", MODEL, "--storage",
                           str(server.root / "runs"), *flags], capture_output=True, text=True, env=user_env(),
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reply = generate(server.port, **{"seed": 0, **request})  # generate.py's default seed
    assert reply.status == 200 and reply.text == proc.stdout.removesuffix("\n")


def batch_requests() -> list[dict]:
    """32 requests of different lengths and options: a quarter greedy, the rest seeded."""
    requests = []
    for i in range(32):
        request = {"prime": ["ROMEO.", "KING", "A", "Ay, ay, a scratch"][i % 4], "length": 60 + 13 * i}
        if i % 4 == 0:
            request |= {"top_k": 1}
        else:
            request |= {"seed": 1000 + i, "temperature": (0.5, 0.8, 1.0, 1.3)[i % 4], "top_k": (0, 3, 10)[i % 3]}
        requests.append(request)
    return requests


def test_a_request_batched_with_others_gets_the_text_it_gets_alone(server):
    requests = batch_requests()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: generate(server.port, timeout=120, **r), requests))
    alone = [generate(server.port, **r) for r in requests]
    assert [r.status for r in together + alone] == [200] * 64
    assert all(len(r.text) == q["length"] for r, q in zip(together, requests))
    differ = [i for i, (a, b) in enumerate(zip(together, alone)) if a.body != b.body]
    assert not differ, f"requests {differ} differ when batched: {[requests[i] for i in differ]}"


def test_concurrent_requests_all_stream_at_once(server):
    """Up to serve.max_batch requests are sampled together: 16 concurrent long requests all begin
    to stream before any of them ends (then they hang up)."""
    clients = [Streaming(server.port, timeout=30, prime="KING", length=MAX_LENGTH, seed=i) for i in range(16)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not all(c.headers.is_set() for c in clients):
        time.sleep(0.05)
    began = [c.began_at for c in clients if c.began_at is not None]
    ended = [c.ended_at for c in clients if c.ended_at is not None]
    for client in clients:
        client.hang_up()
        client.join(30)
    assert len(began) == len(clients) and (not ended or max(began) < min(ended)), \
        f"{len(began)} of {len(clients)} requests began streaming within 8 s, {len(ended)} ended"


BAD_BODIES = {
    "not JSON": (b"ROMEO.", "not JSON"),
    "not UTF-8": (b"\xff\xfe{", "not JSON"),
    "a list": (b'["ROMEO."]', "JSON object"),
    "an unknown key": (b'{"prime": "A", "lenght": 10}', "unknown key 'lenght'"),
    "length a string": (b'{"length": "x"}', "length must be an int"),
    "length a float": (b'{"length": 5.0}', "length must be an int"),
    "seed a bool": (b'{"seed": true}', "seed must be an int"),
    "prime a number": (b'{"prime": 7}', "prime must be a string"),
    "length over max_length": (json.dumps({"length": MAX_LENGTH + 1}).encode(), f"length must be <= {MAX_LENGTH}"),
    "length 0": (b'{"length": 0}', "length must be > 0"),
    "temperature 0": (b'{"temperature": 0}', "temperature must be > 0"),
    "temperature < 0": (b'{"temperature": -0.5}', "temperature must be > 0"),
    "temperature NaN": (b'{"temperature": NaN}', "temperature must be > 0"),
    "top_k over the alphabet": (b'{"top_k": 99}', "top_k must lie in 0..98"),
    "top_k < 0": (b'{"top_k": -1}', "top_k must lie in 0..98"),
    "seed < 0": (b'{"seed": -1}', "seed must lie in"),
    "seed 2**64": (json.dumps({"seed": 2 ** 64}).encode(), "seed must lie in"),
    "prime empty": (b'{"prime": ""}', "prime must hold at least one character"),
    "prime over max_length": (json.dumps({"prime": "x" * (MAX_LENGTH + 1)}).encode(), "prime must be at most"),
}


@pytest.mark.parametrize("body, says", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_bad_request_is_400_with_one_line_of_json(server, body, says):
    reply = call(server.port, "POST", "/generate", body)
    assert reply.status == 400 and reply.headers["Content-Type"] == "application/json"
    assert b"\n" not in reply.body.strip()
    answer = reply.json()
    assert list(answer) == ["error"] and says in answer["error"], answer


def test_a_prime_outside_the_alphabet_is_accepted_and_the_server_goes_on(server):
    reply = generate(server.port, prime="ROMÉO — 你好", length=50, seed=3)
    assert reply.status == 200 and len(reply.text) == 50
    assert call(server.port, "GET", "/healthz").status == 200


def test_a_published_version_is_served_to_new_requests_and_old_ones_finish(server):
    before = generate(server.port, prime="ROMEO.", length=200, seed=9)
    long = Streaming(server.port, prime="ROMEO.", length=MAX_LENGTH, seed=9)
    long.start()
    assert long.headers.wait(30)
    publish(server.root, write_checkpoint(server.root, 2))
    server.wait_version("v0002", POLL_S + RELOAD_MARGIN_S)
    promoted_at = time.monotonic()
    after = generate(server.port, prime="ROMEO.", length=200, seed=9)
    assert after.status == 200 and after.headers["X-Charnn-Version"] == "v0002"
    assert after.text != before.text and call(server.port, "GET", "/healthz").json()["version"] == "v0002"
    long.join(120)
    assert long.error is None and long.reply.status == 200, long.error
    assert long.reply.headers["X-Charnn-Version"] == "v0001" and len(long.reply.text) == MAX_LENGTH
    assert long.reply.text.startswith(before.text)  # v0001's text, all of it
    print(f"the long request ended {long.ended_at - promoted_at:+.2f} s after /model named v0002")


def test_a_version_that_cannot_be_loaded_is_refused_and_the_old_one_goes_on(server):
    broken = server.root / "ckpt-broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes(os.urandom(4096))
    assert publish(server.root, str(broken)) == "v0003"
    deadline = time.monotonic() + POLL_S + RELOAD_MARGIN_S
    while "keeping v0002: cannot load the published version" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    assert server.version() == "v0002"
    reply = generate(server.port, prime="ROMEO.", length=100, seed=9)
    assert reply.status == 200 and reply.headers["X-Charnn-Version"] == "v0002" and len(reply.text) == 100


def outcome(client: Streaming, length: int) -> str:
    if client.is_alive():
        return "hung"
    if client.error is not None:
        return "error"
    if client.reply.status == 200 and len(client.reply.text) == length:
        return "full"
    if client.reply.status >= 500:  # sent to the dead replica before it streamed: Serve's proxy answers 500
        return "error"
    return f"status {client.reply.status}, {len(client.reply.text)} characters, no error"


def test_a_killed_replica_fails_or_finishes_its_requests_and_is_replaced(server):
    # The published v0003 cannot be loaded (the test before): the replica that replaces the killed
    # one serves the newest version that can be, v0002, rather than failing to start.
    assert server.version() == "v0002"
    (replica,) = server.replicas()
    clients = [Streaming(server.port, timeout=20, prime="ROMEO.", length=MAX_LENGTH, seed=i) for i in range(8)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while sum(c.headers.is_set() for c in clients) < 4:  # streaming (queued ones have no headers yet)
        assert time.monotonic() < deadline, "fewer than 4 of 8 requests began within 30 s"
        time.sleep(0.05)
    assert not any(c.reply or c.error for c in clients)  # all of them still in flight
    os.kill(replica, signal.SIGKILL)
    killed_at = time.monotonic()
    for client in clients:
        client.join(max(0.0, killed_at + 60 - time.monotonic()))
    outcomes = [outcome(client, MAX_LENGTH) for client in clients]
    assert set(outcomes) <= {"full", "error"} and "error" in outcomes, outcomes
    server.wait_healthy(60)
    back_s = time.monotonic() - killed_at
    reply = generate(server.port, prime="ROMEO.", length=200, seed=1)
    assert reply.status == 200 and len(reply.text) == 200 and reply.headers["X-Charnn-Version"] == "v0002"
    assert server.replicas() and replica not in server.replicas()
    assert "cannot load demo v0003" in server.log()
    errors = sorted({type(c.error).__name__ for c in clients if c.error is not None})
    print(f"outcomes {outcomes} ({', '.join(errors)}); all ended and healthy again {back_s:.1f} s after the kill")


def test_sigterm_stops_the_server_and_its_embedded_ray(server):
    server.wait_healthy(60)
    processes = descendants(server.process.pid)
    assert server.replicas() and any("raylet" in command_line(p) for p in processes)
    before = len(server.log())
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    deadline = time.monotonic() + 30
    while (left := [p for p in processes if os.path.exists(f"/proc/{p}")]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [command_line(p) for p in left]
    after = server.log()[before:]
    assert server.process.returncode >= 0, f"ended by signal {-server.process.returncode}:\n{after[-2000:]}"
    assert "SIGTERM received" not in after and "Traceback" not in after, after[-2000:]
    with pytest.raises(OSError):
        call(server.port, "GET", "/healthz", timeout=5)
