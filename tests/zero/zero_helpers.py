"""Configs, rank workers and byte formulas shared by the ZeRO tests."""

from __future__ import annotations

import pathlib
import tempfile

from tests.helpers import make_config

STEPS = 20
STAGES = (0, 1, 2, 3)


def zero_config(tmp, *, stage: int, tp: int = 1, steps: int = STEPS, **sections):
    """Small buckets (several per model), and stage 3 releasing every block after each use
    (``stage3_max_reuse_distance`` 0): two all-gathers per block and micro-batch, the paper's 3 Psi."""
    zero = {
        "stage": stage,
        "reduce_bucket_size": 4000,
        "overlap_comm": True,
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 20000,
        "stage3_max_reuse_distance": 0,
    }
    zero.update(sections.pop("zero_optimization", {}))
    train = {"max_steps": steps, "log_interval": 1, "progress": False, **sections.pop("train", {})}
    parallel = {"tensor": tp, **sections.pop("parallel", {})}
    return make_config(tmp, zero_optimization=zero, parallel=parallel, train=train, **sections)


def dp_step_traffic(trainer, ctx) -> dict[str, dict[str, int]]:
    """Run ``trainer.fit()`` and return the first step's data-parallel traffic per collective:
    ``{"bytes": {op: n}, "calls": {op: n}}`` (barriers left out). ``train_step`` resets the counter right
    after its snapshot, so the detail is read inside the snapshot."""
    counter, snapshot, steps = ctx.counter, ctx.counter.snapshot, []

    def record():
        dp = lambda d: {op: n for (op, kind), n in d.items() if kind == "dp" and op != "barrier"}  # noqa: E731
        steps.append({"bytes": dp(counter.detail()), "calls": dp(counter.calls())})
        return snapshot()

    counter.reset()
    counter.snapshot = record
    try:
        trainer.fit()
    finally:
        counter.snapshot = snapshot
    return steps[0]


def train_worker(rank, world, args):
    """Per stage: the losses, the first step's DP bytes by collective, and the model-state bytes."""
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    out = {}
    for stage in args["stages"]:
        cfg = zero_config(pathlib.Path(tempfile.mkdtemp()), stage=stage, tp=args["tp"])
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        ctx.counter.reset()
        trainer = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
        ctx.counter.reset()
        captured: dict = {}
        snapshot = ctx.counter.snapshot  # train_step resets the counter after its snapshot: keep the detail
        ctx.counter.snapshot = lambda c=captured, k=ctx.counter, s=snapshot: (c.update(k.detail()), s())[1]
        first = trainer.train_step()
        ctx.counter.snapshot = snapshot
        detail = {op: n for (op, kind), n in captured.items() if kind == "dp"}
        trainer.fit()
        out[stage] = {
            "losses": [first["loss"]] + [r["loss"] for r in trainer.history],
            "dp_bytes": detail,
            "state_bytes": trainer.optimizer.model_state_bytes(),
            "accum": trainer.batch.grad_accum,
            "psi": sum(p.numel() for g in getattr(trainer.optimizer, "groups", []) for _, p in g.named_params)
            or sum(b.numel for b in trainer.optimizer.buckets),
            "psi_padded": sum(b.padded_numel for b in getattr(trainer.optimizer, "buckets", [])),
            "psi_outer": sum(b.padded_numel for b in getattr(trainer.optimizer, "buckets", []) if b.unit == 0),
        }
    return out
