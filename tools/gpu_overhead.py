"""Host-side overhead on CUDA: per-call CPU cost of the kernel wrappers at tiny sizes (launch-bound), and
where a Trident training step's wall time goes (CPU enqueue vs waiting for the GPU).

PYTHONPATH=. python tools/gpu_overhead.py [--model gpt2-350m] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, n=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def launch_table() -> None:
    from engine import kernels

    dev = "cuda"
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(1, 2, 64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lg = torch.randn(64, 1000, device=dev, dtype=torch.bfloat16, requires_grad=True)
    tgt = torch.randint(0, 1000, (64,), device=dev)
    p = torch.randn(4096, device=dev)

    def fb(f):
        def run():
            y = f()
            y.backward(torch.ones_like(y)) if y.dim() else y.backward()

        return run

    rows = [
        (
            "layer_norm fwd (no grad)",
            lambda: kernels.layer_norm(x.detach(), w.detach(), b.detach()),
            lambda: F.layer_norm(x.detach(), (256,), w.detach(), b.detach()),
        ),
        ("layer_norm fwd+bwd", fb(lambda: kernels.layer_norm(x, w, b)), fb(lambda: F.layer_norm(x, (256,), w, b))),
        (
            "attention fwd+bwd",
            fb(lambda: kernels.attention(q, q, q)),
            fb(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
        ),
        ("cross_entropy fwd+bwd", fb(lambda: kernels.cross_entropy(lg, tgt)), fb(lambda: F.cross_entropy(lg, tgt))),
        (
            "adamw_ 1 pass",
            lambda: kernels.adamw_(
                p,
                p,
                p.clone(),
                p.clone(),
                lr=1e-3,
                beta1=0.9,
                beta2=0.95,
                eps=1e-8,
                weight_decay=0.0,
                step=1,
                check_finite=False,
            ),
            lambda: p.clone(),
        ),
    ]
    print("| op (tiny, launch-bound) | Trident us/call | torch us/call |\n|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {per_call_us(ours):.1f} | {per_call_us(theirs):.1f} |")


def step_breakdown(model: str, mb: int, kernels_on: bool, steps: int = 6) -> None:
    from engine.benchmarks.mfu import bench_config
    from engine.config import parse_config
    from engine.log import RankLogger
    from engine.training.context import RunContext, pick_device
    from engine.training.trainer import Trainer

    raw = bench_config(model, seq=1024, micro_batch=mb, bf16=True, max_steps=100, log_dir="/tmp/trident-overhead")
    raw["model"]["kernels"] = kernels_on
    cfg = parse_config(raw)
    tr = Trainer(cfg, RunContext.single(pick_device(cfg)), log=RankLogger(0, 1))
    for _ in range(3):
        tr.train_step()
    torch.cuda.synchronize()
    t_fb = t_wait = t_opt = 0.0
    wall0 = time.perf_counter()
    for _ in range(steps):
        batches = [tr._split(t) for t in tr.loader.next_step()]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.runner.forward_backward(batches, loss_scale=1.0, n_tokens=float(mb * 1024))
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        tr.optimizer.step(lr=1e-4, loss_scale=1.0)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        t_fb, t_wait, t_opt = t_fb + t1 - t0, t_wait + t2 - t1, t_opt + t3 - t2
    torch.cuda.synchronize()
    t_steps = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t_steps) / steps
    del wall0
    print(
        f"| {model} mb{mb} kernels={kernels_on} | {t_fb / steps * 1e3:.1f} | {t_wait / steps * 1e3:.1f} | "
        f"{t_opt / steps * 1e3:.1f} | {wall * 1e3:.1f} | {mb * 1024 / wall:,.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-350m")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16])
    args = ap.parse_args()
    launch_table()
    print(
        "\n| run | fwd+bwd CPU enqueue ms | then GPU wait ms | optimizer step ms (synced) | train_step wall ms "
        "| tokens/s |\n|---|---|---|---|---|---|"
    )
    for mb in args.micro_batch:
        for on in (True, False):
            step_breakdown(args.model, mb, on)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
