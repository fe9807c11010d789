"""Distributed process setup: process group, topology, groups and the run context of this rank."""

from __future__ import annotations

import contextlib

import torch

from engine.assemble import RunContext, pick_device
from engine.config import TridentConfig


def check_supported(cfg: TridentConfig) -> None:
    """Refuse, by name, layouts whose implementation has not landed yet (never a wrong answer)."""
    from engine.zero import check_zero_layout

    check_zero_layout(cfg)


def build_context(cfg: TridentConfig, *, rank: int, world_size: int, local_rank: int = 0):
    """(RunContext, DistGradSync) for an initialised default process group."""
    from engine.dist.collectives import CommCounter
    from engine.dist.groups import ProcessGroups
    from engine.dist.topology import Topology
    from engine.optim.grad_sync import DistGradSync
    from engine.tensor_parallel.random import RNGTracker

    check_supported(cfg)
    topo = Topology(world_size, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline)
    counter = CommCounter(("dp", "tp", "pp"))
    groups = ProcessGroups.build(topo, rank=rank, counter=counter)
    coord = topo.coords(rank)
    device = pick_device(cfg, local_rank)
    rng = RNGTracker(cfg.train.seed, tp_rank=coord.tp, device=device) if topo.tp > 1 else None
    ctx = RunContext(rank=rank, world_size=world_size, device=device, groups=groups,
                     dp_rank=coord.dp, dp_size=topo.dp, tp_rank=coord.tp, pp_rank=coord.pp, counter=counter,
                     rng=rng)
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
