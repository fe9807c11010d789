"""Distributed process setup: process group, topology, groups and the run context of this rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.config import TridentConfig
from engine.distributed.collectives import CommCounter
from engine.distributed.groups import ProcessGroups
from engine.distributed.launch import LaunchInfo, destroy, init_process_group
from engine.distributed.topology import Topology
from engine.optim.grad_sync import DistGradSync
from engine.tensor_parallel.random import RNGTracker
from engine.training.context import RunContext, pick_device


def build_context(
    cfg: TridentConfig, *, rank: int, world_size: int, local_rank: int = 0
) -> tuple[RunContext, DistGradSync]:
    """(RunContext, DistGradSync) for an initialised default process group."""
    topo = Topology(world_size, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline)
    counter = CommCounter(("dp", "tp", "pp"))
    groups = ProcessGroups.build(topo, rank=rank, counter=counter)
    coord = topo.coords(rank)
    device = pick_device(cfg, local_rank)
    rng = RNGTracker(cfg.train.seed, tp_rank=coord.tp, device=device) if topo.tp > 1 else None
    ctx = RunContext(
        rank=rank,
        world_size=world_size,
        device=device,
        groups=groups,
        dp_rank=coord.dp,
        dp_size=topo.dp,
        tp_rank=coord.tp,
        pp_rank=coord.pp,
        counter=counter,
        rng=rng,
    )
    return ctx, DistGradSync(
        groups, sequence_parallel=cfg.parallel.sequence_parallel, tied_embeddings=cfg.model.tie_embeddings
    )


@contextlib.contextmanager
def distributed_context(cfg: TridentConfig, info: LaunchInfo) -> Iterator[tuple[RunContext, DistGradSync]]:
    """The default process group (NCCL on GPU, gloo on CPU) around the body, with this rank's context."""
    Topology(info.world_size, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline)  # refuse bad sizes early
    backend = "nccl" if cfg.train.device != "cpu" and torch.cuda.is_available() else "gloo"
    init_process_group(info, backend=backend, timeout_s=cfg.resilience.collective_timeout_s)
    try:
        yield build_context(cfg, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank)
    finally:
        destroy()
