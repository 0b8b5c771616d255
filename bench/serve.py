"""Serving benchmark (issue 24): the published model behind Ray Serve under a bounded load of
concurrent streaming clients, and the gap between a promotion and the first response from the new
version.

    .venv/bin/python bench/serve.py                               # a random model of the demo's shape
    .venv/bin/python bench/serve.py --clients 1,8,32 --rounds 3 --length 200 --replicas 1
    .venv/bin/python bench/serve.py --model shakespeare --storage ~/charnn/runs   # an existing registry

The server is started as a user starts it: ``python -m charnn.cli.serve`` in a subprocess, on its
own embedded Ray, every byte on 127.0.0.1 (loopback.env), its output in ``<workdir>/serve.log``;
it is stopped with SIGTERM at the end.  With no ``--model`` the benchmark publishes a random
CharGRU of ``jobs/specs/shakespeare-demo.yaml``'s shape (model.cell_size x model.layers, the
gorner98 alphabet; its "unknown" code, which decodes to nothing, never wins, so that a request's
characters are its codes) as ``bench`` v0001 in a fresh registry under ``--workdir``.

For each N of ``--clients``, N clients (aiohttp, one connection each) each send ``--rounds``
``POST /generate`` requests of ``--length`` characters one after the other (seeded, temperature
1, every request its own seed), after one warm-up round.  Printed per N: characters per second
in total (all characters received over the wall time of the N clients), the p50 and p99 time
from sending a request to its first character, and the p50 and p99 of a request's latency (to
its last character).  Then the batching gain, characters/s at the largest N over characters/s
at the smallest (the issue's target: >= 8x from 1 to 32 clients on 2 cores with the demo model).

Reload gap (own registry only: the benchmark does not publish into a registry it did not make):
``--promotions`` times, a random model of the same shape is published as the next version while
a probe sends 1-character requests back to back; the gap is the seconds from the end of
``ModelRegistry.publish`` to the first response whose ``X-Charnn-Version`` names the new
version.  The promotions are spread evenly over the replicas' poll period (the i-th of n is
published (i + 0.5) / n x ``--poll-s`` after the previous one was seen), so the gaps average about
half of ``--poll-s`` plus the time a replica takes to load the version, and are at most
``--poll-s`` plus that.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every byte on 127.0.0.1: loopback.env, the one copy (KEY=VALUE lines, # comments).
LOOPBACK = dict(line.split("=", 1) for line in (ROOT / "loopback.env").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
MODEL = "bench"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="serve this registered model (with --storage) instead of a random one")
    parser.add_argument("--storage", help="run.storage that holds models/ (with --model)")
    parser.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="requests each client sends (default: %(default)s)")
    parser.add_argument("--length", type=int, default=200, help="characters a request (default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--poll-s", type=float, default=1.0, help="serve.poll_s (default: %(default)s)")
    parser.add_argument("--promotions", type=int, default=5, help="reload gaps to measure (default: %(default)s)")
    parser.add_argument("--workdir", help="where the registry and the server's log go (default: a temp dir)")
    args = parser.parse_args()
    if (args.model is None) != (args.storage is None):
        parser.error("--model and --storage go together")
    return args


def demo_shape() -> tuple[int, int]:
    """(cell_size, layers) of the demo spec, as jobs/train.py resolves it."""
    from charnn.spec_loader import load_spec

    spec = load_spec(str(ROOT / "jobs" / "specs" / "shakespeare-demo.yaml"))
    return spec.model.cell_size, spec.model.layers


def publish_random(workdir: Path, seed: int) -> str:
    """A random CharGRU of the demo's shape, published as the next version of ``bench``."""
    import torch

    from charnn.model import CharGRU, ModelShape
    from charnn.registry import DatasetInfo, ModelRegistry, VersionInfo
    from charnn.storage import Store

    torch.manual_seed(seed)
    model = CharGRU(ModelShape(98, *demo_shape()))
    with torch.no_grad():
        model.head.bias[0] = -50.0  # "unknown" decodes to nothing: never sample it
    directory = workdir / f"ckpt-{seed}"
    directory.mkdir(parents=True)
    torch.save({"format": "charnn.checkpoint/1", "model": model.state_dict(), "shape": model.shape.to_dict(),
                "alphabet": "gorner98"}, directory / "model.pt")
    registry = ModelRegistry(str(workdir / "runs" / "models" / MODEL), Store())
    with registry.lease(60) as lease:
        return registry.publish(str(directory), VersionInfo(dataset=DatasetInfo(sources=[])), lease,
                                replaces=registry.published()).name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: str, storage: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **LOOPBACK}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "charnn.cli.serve", "--model", model, "--storage", storage, "--port", str(port),
               "--replicas", str(args.replicas), "--poll-s", str(args.poll_s),
               "--max-length", str(max(args.length, 2000))]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return process, f"http://127.0.0.1:{port}"


async def wait_healthy(session, url: str, process: subprocess.Popen, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: the server exited {process.returncode}; see its log")
        try:
            async with session.get(f"{url}/model") as response:
                if response.status == 200:
                    return await response.json()
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"bench: no healthy server within {timeout_s:g} s; see its log")


async def one_request(session, url: str, options: dict) -> tuple[float, float, int]:
    """(seconds to the first character, seconds to the last, characters) of one streamed request."""
    started, first, characters = time.monotonic(), None, 0
    async with session.post(f"{url}/generate", json=options) as response:
        if response.status != 200:
            raise SystemExit(f"bench: /generate answered {response.status}: {await response.text()}")
        async for chunk in response.content.iter_any():
            if chunk and first is None:
                first = time.monotonic() - started
            characters += len(chunk.decode())
    return first, time.monotonic() - started, characters


async def client(session, url: str, number: int, args, results: list) -> None:
    for round_ in range(args.rounds):
        options = {"prime": "ROMEO.", "length": args.length, "seed": 1000 * number + round_}
        results.append(await one_request(session, url, options))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(session, url: str, clients: int, args) -> dict:
    """N clients, ``rounds`` requests each; after a warm-up round of N requests."""
    await asyncio.gather(*(one_request(session, url, {"prime": "ROMEO.", "length": args.length, "seed": i})
                           for i in range(clients)))
    results: list[tuple[float, float, int]] = []
    started = time.monotonic()
    await asyncio.gather(*(client(session, url, n, args, results) for n in range(clients)))
    wall = time.monotonic() - started
    firsts, totals = [r[0] for r in results], [r[1] for r in results]
    return {"clients": clients, "chars_per_s": sum(r[2] for r in results) / wall, "requests": len(results),
            "ttfc_p50": percentile(firsts, 0.5), "ttfc_p99": percentile(firsts, 0.99),
            "latency_p50": percentile(totals, 0.5), "latency_p99": percentile(totals, 0.99),
            "short": sum(r[2] != args.length for r in results)}


async def reload_gap(session, url: str, workdir: Path, seed: int, wait_s: float) -> tuple[str, float]:
    """(new version, seconds from its publication to the first response that it served), published
    ``wait_s`` after the previous promotion was seen: that was right after a replica's poll, so
    without a wait it would always wait a whole period."""
    await asyncio.sleep(wait_s)
    version = await asyncio.to_thread(publish_random, workdir, seed)
    published = time.monotonic()
    while True:
        async with session.post(f"{url}/generate", json={"length": 1, "seed": 0}) as response:
            await response.read()
            if response.headers.get("X-Charnn-Version") == version:
                return version, time.monotonic() - published
        if time.monotonic() - published > 120:
            raise SystemExit(f"bench: {version} not served 120 s after its publication")


def print_load(rows: list[dict], args) -> None:
    print(f"{'clients':>7} {'chars/s':>9} {'ttfc p50':>9} {'ttfc p99':>9} {'lat p50':>8} {'lat p99':>8} "
          f"{'requests':>8}   ({args.length} characters a request; seconds)")
    for row in rows:
        print(f"{row['clients']:>7} {row['chars_per_s']:>9.0f} {row['ttfc_p50']:>9.3f} {row['ttfc_p99']:>9.3f} "
              f"{row['latency_p50']:>8.3f} {row['latency_p99']:>8.3f} {row['requests']:>8}"
              + (f"  ({row['short']} short)" if row["short"] else ""))
    gain = rows[-1]["chars_per_s"] / rows[0]["chars_per_s"]
    print(f"batching gain: {gain:.1f}x (chars/s at {rows[-1]['clients']} clients / at {rows[0]['clients']}; "
          f"target >= 8x from 1 to 32)")


async def measure(args, workdir: Path, process: subprocess.Popen, url: str) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600, sock_read=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        described = await wait_healthy(session, url, process)
        print(f"serving {described['model']} {described['version']} at {url}, {args.replicas} replica(s), "
              f"poll_s {args.poll_s:g}")
        rows = [await load(session, url, int(n), args) for n in args.clients.split(",")]
        print_load(rows, args)
        if args.model is not None:
            print("reload gap: not measured (an existing registry: the benchmark publishes only into its own)")
            return
        gaps = []
        for i in range(args.promotions):
            wait_s = (i + 0.5) / args.promotions * args.poll_s  # spread over the poll period
            version, gap = await reload_gap(session, url, workdir, 100 + i, wait_s)
            gaps.append(gap)
            print(f"reload gap: {gap:.2f} s from publishing {version} to its first response (poll_s {args.poll_s:g})")
        if gaps:
            print(f"reload gap: mean {statistics.mean(gaps):.2f} s, max {max(gaps):.2f} s over {len(gaps)} promotions")


def main() -> None:
    args = arguments()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="charnn-bench-serve-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        cell, layers = demo_shape()
        print(f"publishing a random CharGRU {cell} x {layers} (the demo's shape) as {MODEL} in {workdir}/runs")
        publish_random(workdir, 1)
    model, storage = args.model or MODEL, args.storage or str(workdir / "runs")
    process, url = start_server(args, model, storage, workdir / "serve.log")
    print(f"server log: {workdir / 'serve.log'}")
    try:
        asyncio.run(measure(args, workdir, process, url))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
