"""``python -m engine.bench zero [--stages 1,2,3] [--world-size 2] [--steps 8] [--repeats 3]``: Trident's ZeRO
next to DeepSpeed's, side by side on CPU gloo ranks (or GPUs where available with ``--device cuda``).

The same GPT (a Trident ``Transformer`` with the same seed, so the same initial weights), the same
batches (seeded per step and rank), the same JSON-style settings (fp32, AdamW, clipping 1.0, constant lr,
micro-batch 4, no accumulation) are trained by ``deepspeed.initialize``'s engine and by Trident's ZeRO
optimizer, each in its own set of processes. DeepSpeed averages gradients over DP, Trident sums them
(its loss is divided by the global token count), so DeepSpeed's loss is multiplied by the DP size: the
updates are then the same. Printed per stage: both loss curves, their largest relative difference,
the median step time (after 2 warmup steps; DeepSpeed and Trident runs alternate ``--repeats`` times and
the ratio is the median of the pairs' ratios), the peak resident memory per rank (ru_maxrss, which
includes the ~same interpreter and torch baseline for both) and the ratios Trident / DeepSpeed.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

from engine.errors import ConfigError

LR, WD, BETAS, EPS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1e-8, 1.0


def _raw_config(args, stage: int, world: int, log_dir: str) -> dict:
    return {
        "train_batch_size": args.micro_batch * world,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}},
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage, "overlap_comm": True, "stage3_param_persistence_threshold": 0},
        "model": {
            "arch": "gpt2",
            "n_layers": args.layers,
            "d_model": args.d_model,
            "n_heads": 4,
            "seq_len": args.seq_len,
            "vocab_size": args.vocab,
            "dropout": 0.0,
        },
        "data": {"synthetic": True},
        "train": {"max_steps": args.steps, "log_dir": log_dir, "progress": False, "device": args.device},
    }


def _batch(args, step: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _run_trident(cfg, rank: int, world: int, args) -> dict:

    from engine.training.assembly import build_model, build_optimizer
    from engine.training.process import build_context

    ctx, sync = build_context(cfg, rank=rank, world_size=world)
    model = build_model(cfg, ctx)
    opt = build_optimizer(cfg, ctx, model, sync)
    n_tokens = float(args.micro_batch * args.seq_len * world)
    losses, times = [], []
    for step in range(args.steps):
        ids, tgt = (t.to(ctx.device) for t in _batch(args, step, rank))
        t0 = time.perf_counter()
        loss_sum = model(ids, tgt)
        (loss_sum / n_tokens).backward()
        opt.step(lr=LR, loss_scale=1.0)
        total = ctx.dp_sum(loss_sum.detach())
        times.append(time.perf_counter() - t0)
        losses.append(total.item() / n_tokens)
    return {"losses": losses, "times": times, "state_bytes": opt.model_state_bytes()}


def _run_deepspeed(cfg, raw: dict, rank: int, world: int, args) -> dict:
    import deepspeed
    import torch
    from torch import nn

    from engine.model.transformer import Transformer
    from engine.optim.param_groups import split_decay

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = Transformer(cfg.model, seed=cfg.train.seed)

        def forward(self, ids, tgt, scale: float):
            return self.gpt(ids, tgt) * scale

    model = Scaled()
    decay, no_decay = split_decay(list(model.gpt.named_parameters()))
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in decay], "weight_decay": WD},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    ds_cfg = {k: raw[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_clipping")}
    ds_cfg.update(
        zero_optimization={
            "stage": raw["zero_optimization"]["stage"],
            "overlap_comm": True,
            "stage3_param_persistence_threshold": 0,
        },
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    n_tokens = float(args.micro_batch * args.seq_len * world)
    losses, times = [], []
    for step in range(args.steps):
        ids, tgt = (t.to(engine.device) for t in _batch(args, step, rank))
        t0 = time.perf_counter()
        loss = engine(ids, tgt, world / n_tokens)  # DeepSpeed averages over DP: x world = Trident's sum
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        times.append(time.perf_counter() - t0)
        losses.append(total.item() / world)
    return {"losses": losses, "times": times}


def _worker(which: str, stage: int, rank: int, world: int, args, init_file: str, port: int, out) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from engine.config import parse_config

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        raw = _raw_config(args, stage, world, tempfile.mkdtemp(prefix="trident-bench-"))
        cfg = parse_config(raw)
        res = (
            _run_trident(cfg, rank, world, args) if which == "trident" else _run_deepspeed(cfg, raw, rank, world, args)
        )
        res["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.put((rank, res))
    finally:
        dist.destroy_process_group()


def _spawn(which: str, stage: int, args) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="trident-rdzv-") as tmp:
        port = 29500 + (os.getpid() + stage * 7 + (which == "deepspeed")) % 1000
        procs = [
            ctx.Process(
                target=_worker, args=(which, stage, r, args.world_size, args, os.path.join(tmp, "rdzv"), port, out)
            )
            for r in range(args.world_size)
        ]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=900) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    return [results[r] for r in range(args.world_size)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench zero", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="1,2,3", help="comma-separated ZeRO stages (1-3)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="DeepSpeed/Trident run pairs per stage, alternated so that drift in the machine's speed "
        "hits both sides; the ratio reported is the median of the pairs' ratios",
    )
    args = ap.parse_args(argv)
    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        raise ConfigError(f"--stages: {args.stages!r} is not a comma-separated list of integers") from None
    if not stages or any(s not in (1, 2, 3) for s in stages):
        raise ConfigError(f"--stages: {args.stages} must list stages among 1, 2, 3")
    if args.world_size < 1 or args.steps < 3:
        raise ConfigError("--world-size must be >= 1 and --steps >= 3 (2 warmup steps are not timed)")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    print(
        f"GPT {args.layers} layers x d_model {args.d_model}, seq {args.seq_len}, micro-batch {args.micro_batch}, "
        f"fp32, {args.world_size} {args.device} ranks, {args.steps} steps"
    )
    for stage in stages:
        pairs = [(_spawn("deepspeed", stage, args), _spawn("trident", stage, args)) for _ in range(args.repeats)]
        ds, tr = pairs[0]
        rel = max(abs(a - b) / abs(b) for a, b in zip(tr[0]["losses"], ds[0]["losses"]))
        t_ds = statistics.median(statistics.median(d[0]["times"][2:]) for d, _ in pairs)
        t_tr = statistics.median(statistics.median(t[0]["times"][2:]) for _, t in pairs)
        ratios = [statistics.median(t[0]["times"][2:]) / statistics.median(d[0]["times"][2:]) for d, t in pairs]
        print(f"\nZeRO stage {stage}")
        print("  step  deepspeed_loss  trident_loss")
        for i, (a, b) in enumerate(zip(ds[0]["losses"], tr[0]["losses"]), start=1):
            print(f"  {i:4d}  {a:.7f}       {b:.7f}")
        print(f"  max relative loss difference {rel:.2e} (target <= 1e-3)")
        print(
            f"  step time   deepspeed {t_ds * 1e3:.1f} ms  trident {t_tr * 1e3:.1f} ms  ratio "
            f"{statistics.median(ratios):.2f} (target <= 0.80; median of {len(ratios)} alternated pairs: "
            f"{' '.join(f'{r:.2f}' for r in ratios)})"
        )
        for r in range(args.world_size):
            m_ds, m_tr = ds[r]["maxrss_bytes"], tr[r]["maxrss_bytes"]
            print(
                f"  rank {r} peak RSS  deepspeed {m_ds / 2**20:.0f} MiB  trident {m_tr / 2**20:.0f} MiB  "
                f"ratio {m_tr / m_ds:.2f}; trident model states {sum(tr[r]['state_bytes'].values()) / 2**20:.2f} MiB"
            )
    return 0
