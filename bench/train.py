"""Training-step benchmark: bare PyTorch against Ray Train, worker scaling, and MFU.

    .venv/bin/python bench/train.py [--steps 12] [--batch 200] [--threads 2] [--rounds 3]

All figures use the seed's shapes (one-hot 98 -> GRU 512 x 3 -> 98, T 30) and the project's
own ``train_step`` with Adam, on random codes, carrying the hidden state.  Prints:
  - the sgemm peak (2048^3) measured now, with 1 and with --threads threads;
  - tokens/s of a bare single-process loop and of Ray Train with 1 worker, same threads, and
    their ratio (Ray Train overhead);
  - the scaling efficiency of 2 workers x 1 thread against 1 worker x 1 thread;
  - achieved GFLOP/s against the peak (MFU).
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_loop(batch: int, steps: int, threads: int, ddp: bool = False) -> dict:
    """The Trainer's training step (``charnn.train.step.train_step``), timed after warm-up;
    returns tokens/s (this worker)."""
    from charnn.train.step import Parts, train_step
    from charnn.model import CharGRU, ModelShape
    from charnn.train.optim import make_optimizer
    from charnn.config import TrainConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CharGRU(ModelShape(98, 512, 3), dropout=0.0)
    optimizer, scheduler = make_optimizer(model, TrainConfig(), steps, use_gpu=False)
    parts = Parts(torch.nn.parallel.DistributedDataParallel(model) if ddp else model, optimizer, scheduler)
    codes = torch.randint(0, 98, (batch, 31))
    x, y = codes[:, :-1], codes[:, 1:]
    states = model.zero_state(batch)
    warmup = 3
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss, _, states, _ = train_step(parts, x, y, states)
    float(loss)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batch * 30 * steps / seconds, "flops_per_token": model.flops_per_token(),
            "omp": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(), "nice": os.nice(0)}


def ray_loop(config: dict) -> None:
    import json

    import ray.train

    result = step_loop(config["batch"], config["steps"], config["threads"], ddp=config["workers"] > 1)
    if ray.train.get_context().get_world_rank() == 0:  # metrics without a checkpoint do not reach Result
        with open(config["out"], "w") as f:
            json.dump(result, f)


def on_ray_train(workers: int, threads: int, batch: int, steps: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import json
    import tempfile

    out = tempfile.mktemp(suffix=".json")
    trainer = TorchTrainer(
        ray_loop, train_loop_config={"batch": batch, "steps": steps, "threads": threads, "workers": workers, "out": out},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=f"bench-{workers}x{threads}-{time.time_ns()}", storage_path="/tmp/charnn-bench-runs"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="bare and Ray runs alternate this many times; ratios are per round, then the median")
    args = parser.parse_args()
    import statistics

    import ray

    peak_n, peak_1 = matmul_peak(args.threads), matmul_peak(1)
    rounds = []
    for _ in range(args.rounds):
        bare_n = step_loop(args.batch, args.steps, args.threads)
        bare_1 = step_loop(args.batch, args.steps, 1)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray_n = on_ray_train(1, args.threads, args.batch, args.steps)
        ray_1 = on_ray_train(1, 1, args.batch, args.steps)
        ray_2x1 = on_ray_train(2, 1, args.batch, args.steps)
        ray.shutdown()
        rounds.append({"bare_n": bare_n["tokens_per_s"], "bare_1": bare_1["tokens_per_s"], "ray_n": ray_n["tokens_per_s"],
                       "ray_1": ray_1["tokens_per_s"], "ray_2x1": ray_2x1["tokens_per_s"], "worker": ray_n})

    def span(key: str) -> str:
        values = sorted(r[key] for r in rounds)
        return f"{statistics.median(values):,.0f} tok/s (range {values[0]:,.0f}-{values[-1]:,.0f})"

    def ratio(numerator: str, denominator: str) -> str:
        values = sorted(r[numerator] / r[denominator] for r in rounds)
        return f"{statistics.median(values):.3f} (range {values[0]:.3f}-{values[-1]:.3f})"

    flops = bare_n["flops_per_token"]
    mfu = statistics.median(r["bare_n"] for r in rounds) * flops / 1e9 / peak_n
    ray_mfu = statistics.median(r["ray_n"] for r in rounds) * flops / 1e9 / peak_n
    worker = rounds[-1]["worker"]
    print(f"shapes: one-hot 98 -> GRU 512x3 -> 98, batch {args.batch}, T 30; {flops / 1e6:.1f} MFLOP/token (training); "
          f"{args.rounds} rounds of {args.steps} steps, medians")
    print(f"sgemm 2048^3 peak: {peak_n:.0f} GFLOP/s with {args.threads} threads, {peak_1:.0f} GFLOP/s with 1")
    print(f"bare loop, {args.threads} threads: {span('bare_n')}, MFU {mfu:.2f}")
    print(f"Ray Train 1 worker x {args.threads} threads: {span('ray_n')}, MFU {ray_mfu:.2f}; "
          f"ratio to bare {ratio('ray_n', 'bare_n')}  [worker OMP_NUM_THREADS={worker['omp']} "
          f"torch threads={worker['torch_threads']} nice={worker['nice']}]")
    print(f"1 thread: bare {span('bare_1')}; Ray Train {span('ray_1')}; ratio {ratio('ray_1', 'bare_1')}")
    print(f"2 workers x 1 thread: {span('ray_2x1')} per worker; scaling efficiency vs 1x1 {ratio('ray_2x1', 'ray_1')}")


if __name__ == "__main__":
    main()
