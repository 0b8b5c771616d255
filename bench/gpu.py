"""GPU figures, without Ray (the GPU machine has torch but not Ray): ``bench/gpu.sh`` runs them.

    python3 bench/gpu.py speed [--batches 200,1024,4096] [--steps 40]
    python3 bench/gpu.py quality --dataset DIR [--minutes 4] [--lr 0.003] [--dropout 0.2]

``speed``: tokens/s of the project's ``train_step`` (GRU 512 x 3, T 30, Adam, carried state) at
each batch, in fp32, in bf16 autocast, and in bf16 replayed as one CUDA graph, with MFU
against a bf16 matmul peak measured in the same run.

``quality``: the quality recipe on one GPU for a wall-clock budget, reading a dataset built
here for one worker (``make gpu-data``) with the pipeline's own reader, carrying the hidden
state across steps and epochs as the Ray Train loop does (one worker: the epoch roll is
``roll_rows`` with no neighbour), validating on every validation row once a minute, and
printing the time to reach each validation loss.
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
            except Exception as error:  # a mode that fails (capture, memory) must not hide the others
                print(f"{batch:>6} {mode:>11} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            torch.cuda.empty_cache()


def quality(args) -> None:
    from charnn.data.dataset import load_manifest
    from charnn.data.reader import SplitReader
    from charnn.train.carry import roll_rows
    from charnn.train.optim import lr_factor
    from charnn.train.step import evaluate, to_batch, train_step

    manifests = glob.glob(os.path.join(args.dataset, "**", "manifest.json"), recursive=True)
    if not manifests:
        sys.exit(f"bench/gpu.py: no dataset under {args.dataset}; build one with `make gpu-data` and carry it")
    url = os.path.dirname(manifests[0])
    manifest = load_manifest(url)
    train_rows = SplitReader(url, manifest, "train", 0, 1)
    val_rows = SplitReader(url, manifest, "val", 0, 1)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    torch.manual_seed(0)
    model = CharGRU(ModelShape(manifest.alphabet_size, 512, 3), dropout=args.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=on_gpu or None)
    budget = args.minutes * 60
    warmup = int(args.warmup * 10_000)
    step, epoch, trained, last_val, curve = 0, 0, 0.0, 0.0, []
    # the schedule runs over the time budget, not a step count: progress in 1/10,000ths of it
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: lr_factor(int(trained / budget * 10_000), 10_000, warmup, "cosine", 0.05))
    states = model.zero_state(len(train_rows.rows), device)
    print(f"{url}: {len(train_rows.rows)} rows, {train_rows.steps} steps/epoch, {manifest.splits['val'].tokens:,} "
          f"validation tokens; lr {args.lr} cosine over {args.minutes} min, dropout {args.dropout}", flush=True)
    while trained < budget:
        for _, window in train_rows.windows():
            started = time.perf_counter()
            x, y = to_batch(window, device)
            loss, _, states, _ = train_step(model, optimizer, scheduler, x, y, states, 1.0, device)
            step += 1
            if step % 50 == 0:
                sync()
            trained += time.perf_counter() - started
            if trained - last_val >= 60 or trained >= budget:
                sync()
                figures = evaluate(model, val_rows, device)
                last_val = trained
                curve.append((trained, step, epoch, figures["val_loss"]))
                print(f"step {step} epoch {epoch} train loss {float(loss):.4f} val_loss {figures['val_loss']:.4f} "
                      f"val_acc {figures['val_accuracy']:.3f} train {trained:.0f}s", flush=True)
            if trained >= budget:
                break
        epoch += 1
        states = roll_rows(states, None)
    for threshold in THRESHOLDS:
        hit = next((point for point in curve if point[3] <= threshold), None)
        print(f"val loss {threshold:.2f}: " + (f"{hit[0] / 60:.1f} min of training, step {hit[1]}, epoch {hit[2]}"
                                               if hit else "not reached"))
    print(f"best val loss {min(p[3] for p in curve):.4f}; {step * len(train_rows.rows) * train_rows.seq_len / trained:,.0f} "
          f"tokens/s including the Python loop")


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
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the budget")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the loop here")
    args = parser.parse_args()
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device; run it on the GPU machine (bench/gpu.sh)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    speed(args) if args.command == "speed" else quality(args)


if __name__ == "__main__":
    main()
