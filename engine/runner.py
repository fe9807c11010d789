"""Process setup around the trainer: launch discovery, process groups, device, teardown."""

from __future__ import annotations

from engine.assemble import RunContext, pick_device
from engine.config import TridentConfig
from engine.log import RankLogger
from engine.trainer import Trainer


def run_training(cfg: TridentConfig, *, resume=None, fresh: bool = False, local_rank: int | None = None) -> dict:
    from engine.dist.launch import discover

    info = discover()
    if info.world_size == 1:
        ctx = RunContext.single(pick_device(cfg, info.local_rank if local_rank is None else local_rank))
        trainer = Trainer(cfg, ctx, log=RankLogger(0, 1), resume=resume, fresh=fresh)
        summary = trainer.fit()
        return {**summary, "rank": 0}
    from engine.parallel_setup import distributed_context

    with distributed_context(cfg, info) as (ctx, grad_sync):
        trainer = Trainer(cfg, ctx, log=RankLogger(ctx.rank, ctx.world_size), resume=resume, fresh=fresh,
                          grad_sync=grad_sync)
        summary = trainer.fit()
        return {**summary, "rank": ctx.rank}
