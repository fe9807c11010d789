"""``python -m engine.bench mfu --model gpt2-350m [--seq 1024] [--micro-batch 8] [--steps 10]``

End-to-end single-device training throughput of Trident (its kernels on CUDA) beside a plain-PyTorch
baseline of the same model (SDPA, fused AdamW, autocast, torch.compile when available), measured in the
same run: tokens/s, achieved TFLOP/s, MFU against the device's dense peak, peak memory, and the ratio.
On CUDA, Trident runs twice: with ``train.cuda_graphs`` (forward and backward replayed as CUDA graphs)
and eagerly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from engine.errors import ConfigError

PRESETS = {  # (layers, d_model, heads)
    "tiny": (2, 128, 4),
    "gpt2-124m": (12, 768, 12),
    "gpt2-350m": (24, 1024, 16),
    "gpt2-760m": (24, 1536, 16),
    "gpt2-1.3b": (24, 2048, 16),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem(device: torch.device) -> int:
    from engine.metrics.writer import peak_memory_bytes

    return peak_memory_bytes(device)


def bench_config(model: str, *, seq: int, micro_batch: int, bf16: bool, max_steps: int, log_dir: str, **train) -> dict:
    """The JSON config both sides of the MFU bench train (and tools/gpu_*.py profile): a GPT-2 preset on
    synthetic data, one micro-batch per step, AdamW, clipping at 1.0."""
    layers, d, heads = PRESETS[model]
    return {
        "train_batch_size": micro_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "model": {
            "arch": "gpt2",
            "n_layers": layers,
            "d_model": d,
            "n_heads": heads,
            "seq_len": seq,
            "vocab_size": 50304,
        },
        "data": {"synthetic": True},
        "train": {"max_steps": max_steps, "progress": False, "log_dir": log_dir, **train},
    }


def measure_trident(raw: dict, *, steps: int, warmup: int) -> tuple[float, int]:
    from engine.config import parse_config
    from engine.log import RankLogger
    from engine.training.context import RunContext, pick_device
    from engine.training.trainer import Trainer

    cfg = parse_config(raw)
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, RunContext.single(device), log=RankLogger(0, 1))
    for _ in range(warmup):
        trainer.train_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(device)
    return (time.perf_counter() - t0) / steps, _peak_mem(device)


def measure_baseline(raw: dict, *, steps: int, warmup: int, compile_model: bool) -> tuple[float, int]:
    from engine.benchmarks.baseline_gpt import BaselineGPT

    m = raw["model"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = BaselineGPT(
        n_layers=m["n_layers"],
        d_model=m["d_model"],
        n_heads=m["n_heads"],
        seq_len=m["seq_len"],
        vocab_size=m["vocab_size"],
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(model) if compile_model else model
    dtype = torch.bfloat16 if raw.get("bf16", {}).get("enabled") else torch.float32
    mb = raw["train_micro_batch_size_per_gpu"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m["vocab_size"], (mb, m["seq_len"] + 1), generator=gen).to(device)

    def one_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    return (time.perf_counter() - t0) / steps, _peak_mem(device)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench mfu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-350m", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: device table)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="baseline without torch.compile")
    p.add_argument("--no-graphs", action="store_true", help="skip the train.cuda_graphs row (CUDA only)")
    args = p.parse_args(argv)
    if args.model not in PRESETS:
        raise ConfigError(f"--model: '{args.model}' is not one of {', '.join(PRESETS)}")
    layers, d, heads = PRESETS[args.model]
    cuda = torch.cuda.is_available()
    raw = bench_config(
        args.model,
        seq=args.seq,
        micro_batch=args.micro_batch,
        bf16=cuda,
        max_steps=args.steps + args.warmup,
        log_dir="/tmp/trident-bench-mfu",
        peak_tflops=args.peak_tflops,
    )
    from engine.config import parse_config
    from engine.metrics.flops import device_peak_tflops, flops_per_token

    cfg = parse_config(raw)
    tokens = args.micro_batch * args.seq
    fpt = flops_per_token(cfg.model)
    peak = args.peak_tflops or device_peak_tflops(torch.cuda.get_device_name() if cuda else None, cfg.dtype_name)
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA device: GPU figures are unmeasured)"
    print(
        f"device: {device}; torch {torch.__version__}; model {args.model} ({layers}x{d}, {heads} heads), "
        f"seq {args.seq}, micro-batch {args.micro_batch}, {cfg.dtype_name}; peak {peak or 'unknown'} TFLOP/s"
    )
    rows = []
    if cuda and not args.no_graphs:
        graphed = {**raw, "train": {**raw["train"], "cuda_graphs": True}}
        rows.append(("trident + CUDA graphs", *measure_trident(graphed, steps=args.steps, warmup=args.warmup)))
        torch.cuda.empty_cache()
    rows.append(("trident", *measure_trident(raw, steps=args.steps, warmup=args.warmup)))
    if not args.no_baseline:
        compile_ok = cuda and not args.no_compile and hasattr(torch, "compile")
        rows.append(
            (
                f"pytorch{' + compile' if compile_ok else ''}",
                *measure_baseline(raw, steps=args.steps, warmup=args.warmup, compile_model=compile_ok),
            )
        )
    print("| run | step s | tokens/s | TFLOP/s | MFU | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for name, step_s, mem in rows:
        tflops = tokens / step_s * fpt / 1e12
        util = f"{tflops / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {step_s:.4f} | {tokens / step_s:,.0f} | {tflops:.3f} | {util} | {mem / 2**30:.2f} |")
    if not args.no_baseline:
        for name, step_s, _ in rows[:-1]:
            print(f"{name} / baseline throughput: {rows[-1][1] / step_s:.2f}x")
    return 0
