"""Where a training step's time goes: the project's ``train_step`` under the torch profiler.

    .venv/bin/python bench/step_profile.py [--batch 200] [--threads 2] [--steps 5] [--device cpu|cuda] [--trace PATH]

The seed's shapes (one-hot 98 -> GRU 512 x 3 -> 98, T 30), carrying the hidden state, Adam
with a schedule and clipping, as in training.  Prints the step's time split by the regions
``train_step`` labels (forward and loss, backward, clipping, optimiser) and what lies outside
them (input, Python, syncs); the share of the matrix products, which the FLOP count is made
of; then the 15 most expensive operators.  ``--trace`` writes a Chrome
trace (chrome://tracing, Perfetto) of the profiled steps.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def is_matrix_product(name: str, on_gpu: bool) -> bool:
    """The matrix products that the FLOP count (and MFU) is made of.  On CPU, autograd's nn.GRU
    runs as per-time-step aten::addmm/mm plus pointwise gate ops (there is no fused oneDNN GRU for
    training); on GPU, the GEMM and cuDNN RNN kernels."""
    if on_gpu:
        lowered = name.lower()
        return not name.startswith("aten::") and any(k in lowered for k in ("gemm", "rnn", "gru", "xmma"))
    return name in MATMUL_OPS


def make_step(batch: int, device: torch.device):
    """The Trainer's training step on the seed's shapes and random codes, carrying the state."""
    from charnn.config import TrainConfig
    from charnn.model import CharGRU, ModelShape
    from charnn.train.optim import make_optimizer
    from charnn.train.step import Parts, train_step

    torch.manual_seed(0)
    model = CharGRU(ModelShape(98, 512, 3), dropout=0.0).to(device)
    optimizer, scheduler = make_optimizer(model, TrainConfig(), 1000, use_gpu=device.type == "cuda")
    parts = Parts(model, optimizer, scheduler, grad_clip=1.0, device=device)
    codes = torch.randint(0, 98, (batch, 31), device=device)
    x, y = codes[:, :-1], codes[:, 1:]
    states = model.zero_state(batch, device)

    def step():
        nonlocal states
        loss, _, states, _ = train_step(parts, x, y, states)
        return loss

    return step


def profile_steps(step, steps: int, on_gpu: bool):
    """(the profiler, ms per step) of ``steps`` steps after a warm-up."""
    for _ in range(3):  # warm-up: allocator, oneDNN/cuDNN plans
        step()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            loss = step()
        sync()
    float(loss)
    return prof, (time.perf_counter() - start) / steps * 1e3


def report(prof, step_ms: float, args) -> None:
    from charnn.train.step import STEP_REGIONS

    on_gpu = args.device == "cuda"
    averages = prof.key_averages()
    total = "device_time_total" if on_gpu else "cpu_time_total"
    own = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    by_name = {e.key: e for e in averages}
    print(f"{args.device}, batch {args.batch}, threads {torch.get_num_threads()}: {step_ms:.1f} ms/step "
          f"({args.batch * 30 / step_ms * 1e3:,.0f} tok/s under the profiler)")
    accounted = 0.0
    for region in STEP_REGIONS:
        ms = getattr(by_name[region], total) / 1e3 / args.steps if region in by_name else 0.0
        accounted += ms
        print(f"  {region:<10} {ms:8.1f} ms  {ms / step_ms:6.1%}")
    print(f"  {'other':<10} {step_ms - accounted:8.1f} ms  {(step_ms - accounted) / step_ms:6.1%}  (input, Python, syncs)")
    matmul_ms = sum(getattr(e, own) for e in averages if is_matrix_product(e.key, on_gpu)) / 1e3 / args.steps
    print(f"  matrix products {matmul_ms:.1f} ms, {matmul_ms / step_ms:.1%} of the step (the FLOPs MFU counts); "
          f"the rest of forward and backward is the gates' pointwise ops, concatenations and copies")
    print(averages.table(sort_by=own, row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--trace", help="write a Chrome trace here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prof, step_ms = profile_steps(make_step(args.batch, device), args.steps, device.type == "cuda")
    report(prof, step_ms, args)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")


if __name__ == "__main__":
    main()
