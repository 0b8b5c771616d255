"""GPU figures, without Ray (the GPU machine has torch but not Ray): ``bench/gpu.sh`` runs them.

    python3 bench/gpu.py speed [--batches 200,1024,4096] [--steps 40]
    python3 bench/gpu.py quality --dataset DIR [--minutes 4] [--lr 0.003] [--dropout 0.2] [--validate-every 500]

``speed``: tokens/s of the project's ``train_step`` (GRU 512 x 3, T 30, Adam, carried state) at
each batch, in fp32, in bf16 autocast, and in bf16 replayed as one CUDA graph, with MFU
against a bf16 matmul peak measured in the same run.

``quality``: the quality recipe on one GPU for a budget of training time (``train.minutes``):
the project's Trainer in this process (a ``LocalContext``, no Ray) on a dataset built here for
one worker (``make gpu-data``), validating every ``--validate-every`` steps, then the time it
took to reach each validation loss, read from the run's ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch
import torch.nn.functional as F

from charnn.model import CharGRU, ModelShape

THRESHOLDS = (1.60, 1.50, 1.45, 1.40, 1.35, 1.30)


def bf16_peak(n: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def make_step(model, optimizer, x, y, h, bf16: bool):
    """One training step on fixed tensors that carries ``h`` in place, as a closure (graph-capturable)."""
    def step():
        # no autocast weight cache: a captured graph must not keep casts made outside it
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            logits, h_next = model(x, h)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # grads stay at fixed addresses for graph replay
        h.copy_(h_next.detach().float())
        return loss.detach()
    return step


def tokens_per_s(batch: int, steps: int, mode: str) -> float:
    torch.manual_seed(0)
    model = CharGRU(ModelShape(98, 512, 3), dropout=0.0).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=mode == "bf16+graph")
    codes = torch.randint(0, 98, (batch, 31), device="cuda")
    x, y = codes[:, :-1].contiguous(), codes[:, 1:].contiguous()
    h = model.zero_state(batch, "cuda")
    step = make_step(model, optimizer, x, y, h, bf16=mode != "fp32")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    run = step
    if mode == "bf16+graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return batch * 30 * steps / (time.perf_counter() - start)


def speed(args) -> None:
    peak = bf16_peak()
    flops = CharGRU(ModelShape(98, 512, 3)).flops_per_token()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.0f} TFLOP/s (8192^3); "
          f"{flops / 1e6:.1f} MFLOP/token (training); cuDNN {torch.backends.cudnn.version()}")
    print(f"{'batch':>6} {'mode':>11} {'tokens/s':>12} {'MFU':>6}")
    for batch in args.batches:
        for mode in ("fp32", "bf16", "bf16+graph"):
            try:
                rate = tokens_per_s(batch, args.steps, mode)
                print(f"{batch:>6} {mode:>11} {rate:>12,.0f} {rate * flops / 1e12 / peak:>6.3f}", flush=True)
            except Exception as error:  # noqa: BLE001 - a mode that fails (capture, memory) must not hide the others
                print(f"{batch:>6} {mode:>11} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            torch.cuda.empty_cache()


def quality(args) -> None:
    """The quality recipe for a time budget: the Trainer itself, in this process (no Ray)."""
    from charnn.spec_loader import load_spec
    from charnn.storage import Store
    from charnn.train.context import LocalContext
    from charnn.train.metrics import read_points
    from charnn.train.trainer import Trainer

    manifests = glob.glob(os.path.join(args.dataset, "**", "manifest.json"), recursive=True)
    if not manifests:
        sys.exit(f"bench/gpu.py: no dataset under {args.dataset}; build one with `make gpu-data` and carry it")
    run_url = os.path.join(args.runs, f"gpu-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "jobs", "specs", "shakespeare-quality.yaml"), [
        "cluster.num_workers=1", "train.batch_per_worker=256", f"train.minutes={args.minutes}",
        f"train.lr={args.lr}", f"model.dropout={args.dropout}", f"train.validate_every={args.validate_every}",
        "train.checkpoint_every=0", f"cluster.use_gpu={str(args.device == 'cuda').lower()}",
        f"run.storage={os.path.dirname(run_url)}", f"run.name={os.path.basename(run_url)}"])
    Trainer(spec, os.path.dirname(manifests[0]), LocalContext(run_url, Store(), torch.device(args.device))).train()
    validation = read_points(Store(), run_url)["val"]
    for threshold in THRESHOLDS:
        hit = next((p for p in validation if p.loss <= threshold), None)
        print(f"val loss {threshold:.2f}: " + (f"{hit.train_seconds / 60:.1f} min of training, step {hit.step}"
                                               if hit else "not reached"))
    print(f"best val loss {min(p.loss for p in validation):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("speed")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[200, 1024, 4096])
    p.add_argument("--steps", type=int, default=40)
    p = commands.add_parser("quality")
    p.add_argument("--dataset", required=True)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--validate-every", type=int, default=500, help="steps")
    p.add_argument("--runs", default="/tmp/charnn-gpu-runs", help="where the run's files go")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the loop here")
    args = parser.parse_args()
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device; run it on the GPU machine (bench/gpu.sh)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    speed(args) if args.command == "speed" else quality(args)


if __name__ == "__main__":
    main()
