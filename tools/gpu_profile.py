"""Profile one configuration of ``python -m engine.bench mfu`` on CUDA: where a Trident step's time goes.

PYTHONPATH=. python tools/gpu_profile.py [--model gpt2-350m] [--seq 1024] [--micro-batch 8] [--steps 3]
    [--trace out.json]
Prints the top CUDA kernels by total device time, the top CPU ops, and the step's wall time against the
sum of its kernel times (a large gap means the step is bound by the host, not the GPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine.benchmarks.mfu import bench_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-350m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--set", action="append", default=[], help="model.key=value overrides (JSON values)")
    args = ap.parse_args()
    import json

    from engine.config import parse_config
    from engine.log import RankLogger
    from engine.training.context import RunContext, pick_device
    from engine.training.trainer import Trainer

    raw = bench_config(
        args.model, seq=args.seq, micro_batch=args.micro_batch, bf16=True, max_steps=100, log_dir="/tmp/trident-profile"
    )
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = json.loads(value)
    cfg = parse_config(raw)
    device = pick_device(cfg)
    trainer = Trainer(cfg, RunContext.single(device), log=RankLogger(0, 1))
    for _ in range(3):
        trainer.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    dev_total = sum(e.self_device_time_total for e in events) / 1e6 / args.steps
    print(f"step wall {wall * 1e3:.1f} ms (under the profiler); sum of kernel times {dev_total * 1e3:.1f} ms")
    print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
