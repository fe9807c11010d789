"""Distributed process setup: process group, topology, groups and the run context of this rank."""

from __future__ import annotations

import contextlib

import torch

from engine.assemble import RunContext, pick_device
from engine.config import TridentConfig
from engine.errors import ConfigError


def check_supported(cfg: TridentConfig) -> None:
    """Refuse, by name, layouts whose implementation has not landed yet (never a wrong answer)."""
    if cfg.parallel.pipeline > 1:
        raise ConfigError(f"parallel.pipeline: {cfg.parallel.pipeline} stages are not supported yet "
                          "(pipeline parallelism has not landed)", hint="set parallel.pipeline=1")
    if cfg.zero_optimization.stage > 0:
        raise ConfigError(f"zero_optimization.stage: stage {cfg.zero_optimization.stage} is not supported yet "
                          "(ZeRO sharding has not landed)", hint="use stage 0 (plain data parallelism)")


def build_context(cfg: TridentConfig, *, rank: int, world_size: int, local_rank: int = 0):
    """(RunContext, DistGradSync) for an initialised default process group."""
    from engine.dist.collectives import CommCounter
    from engine.dist.groups import ProcessGroups
    from engine.dist.topology import Topology
    from engine.optim.grad_sync import DistGradSync

    check_supported(cfg)
    topo = Topology(world_size, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline)
    counter = CommCounter(("dp", "tp", "pp"))
    groups = ProcessGroups.build(topo, rank=rank, counter=counter)
    coord = topo.coords(rank)
    ctx = RunContext(rank=rank, world_size=world_size, device=pick_device(cfg, local_rank), groups=groups,
                     dp_rank=coord.dp, dp_size=topo.dp, tp_rank=coord.tp, pp_rank=coord.pp, counter=counter)
    return ctx, DistGradSync(groups, sequence_parallel=cfg.parallel.sequence_parallel,
                            tied_embeddings=cfg.model.tie_embeddings)


@contextlib.contextmanager
def distributed_context(cfg: TridentConfig, info):
    from engine.dist.launch import destroy, init_process_group
    from engine.dist.topology import Topology

    check_supported(cfg)
    Topology(info.world_size, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline)  # refuse bad sizes early
    backend = "nccl" if cfg.train.device != "cpu" and torch.cuda.is_available() else "gloo"
    init_process_group(info, backend=backend, timeout_s=cfg.resilience.collective_timeout_s)
    try:
        yield build_context(cfg, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank)
    finally:
        destroy()
