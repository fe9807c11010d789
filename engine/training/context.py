"""Who this process is and how it talks to the others: the run context every component is built with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import TridentConfig
from engine.distributed import collectives
from engine.distributed.collectives import CommCounter
from engine.distributed.groups import ProcessGroups
from engine.errors import ConfigError
from engine.tensor_parallel.random import RNGTracker


@dataclass
class RunContext:
    """This rank's coordinates, groups and device. ``groups`` is None for a single process."""

    rank: int
    world_size: int
    device: torch.device
    groups: ProcessGroups | None = None
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    counter: CommCounter | None = None  # bytes per group kind, read and reset each step
    rng: RNGTracker | None = None  # dropout RNG inside tensor-parallel regions (tp > 1)

    @classmethod
    def single(cls, device: torch.device) -> RunContext:
        return cls(rank=0, world_size=1, device=device)

    def dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the data-parallel group (a copy; ``value`` itself when there is none)."""
        if self.groups is None or self.dp_size == 1:
            return value
        value = value.clone()
        collectives.all_reduce(value, group=self.groups.dp)
        return value

    def all_ranks_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a min all-reduce of a device tensor: NCCL has no CPU path)."""
        if self.groups is None:
            return flag
        t = torch.tensor(1.0 if flag else 0.0, device=self.device)
        collectives.all_reduce(t, self.groups.world, op="min")
        return t.item() == 1.0

    def barrier(self) -> None:
        if self.groups is not None:
            collectives.barrier(group=self.groups.world)


def pick_device(cfg: TridentConfig, local_rank: int = 0) -> torch.device:
    """``train.device``: CUDA device ``local_rank`` when asked for (or available with ``auto``), else CPU."""
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError('train.device: "cuda" requested but CUDA is not available')
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
