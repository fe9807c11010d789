"""The pure ``dp x pp x tp`` rank grid: no processes, no torch, testable in milliseconds.

Rank order follows Megatron-LM: tp varies fastest, then dp, then pp::

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

so the ranks of a TP group are consecutive (they sit inside one node, where the bandwidth is), and a
pipeline stage is a contiguous block of ``dp * tp`` ranks. Groups are *lists of global ranks*; building
the torch process groups from them is ``engine.distributed.groups``' job.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError

# Group kinds, in the order every rank builds them (see groups.py). "embedding" joins the first and last
# pipeline stage (tied input/output embeddings sum their gradients there); "model_parallel" is tp x pp.
GROUP_KINDS = ("tp", "dp", "pp", "embedding", "model_parallel")


@dataclass(frozen=True)
class Coord:
    """Position of one rank in the grid."""

    dp: int
    pp: int
    tp: int


class Topology:
    """``world_size = dp * pp * tp`` with dp derived; refuses sizes that do not divide."""

    def __init__(self, world_size: int, *, tp: int = 1, pp: int = 1) -> None:
        for key, value in (("world size", world_size), ("parallel.tensor", tp), ("parallel.pipeline", pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if world_size % (tp * pp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor={tp} x parallel.pipeline={pp}"
                f" = {tp * pp}",
                hint="launch a multiple of tensor x pipeline processes, or change the parallel sizes",
            )
        self.world_size = world_size
        self.tp = tp
        self.pp = pp
        self.dp = world_size // (tp * pp)

    def __repr__(self) -> str:
        return f"Topology(world_size={self.world_size}, dp={self.dp}, pp={self.pp}, tp={self.tp})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and (self.world_size, self.tp, self.pp) == (
            other.world_size,
            other.tp,
            other.pp,
        )

    def __hash__(self) -> int:
        return hash((self.world_size, self.tp, self.pp))

    # --- single ranks --------------------------------------------------------------------------------

    def coords(self, rank: int) -> Coord:
        self._check_rank(rank)
        tp_index = rank % self.tp
        dp_index = (rank // self.tp) % self.dp
        pp_index = rank // (self.tp * self.dp)
        return Coord(dp=dp_index, pp=pp_index, tp=tp_index)

    def rank(self, *, dp: int, pp: int, tp: int) -> int:
        for name, value, size in (("dp", dp, self.dp), ("pp", pp, self.pp), ("tp", tp, self.tp)):
            if not 0 <= value < size:
                raise ValueError(f"{name} index {value} outside [0, {size}) in {self!r}")
        return pp * (self.dp * self.tp) + dp * self.tp + tp

    def is_first_stage(self, rank: int) -> bool:
        return self.coords(rank).pp == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.coords(rank).pp == self.pp - 1

    # --- groups: each a list of global ranks, ascending; together they partition the world ------------

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(dp=d, pp=p, tp=t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(dp=d, pp=p, tp=t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        """Index i of a pp group is pipeline stage i."""
        return [[self.rank(dp=d, pp=p, tp=t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline (one rank when pp == 1): where tied embeddings live."""
        return [sorted({g[0], g[-1]}) for g in self.pp_groups()]

    def model_parallel_groups(self) -> list[list[int]]:
        """All tp x pp ranks sharing one dp index: together they hold one full model replica."""
        return [
            sorted(self.rank(dp=d, pp=p, tp=t) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)
        ]

    def groups(self, kind: str) -> list[list[int]]:
        builders = {
            "tp": self.tp_groups,
            "dp": self.dp_groups,
            "pp": self.pp_groups,
            "embedding": self.embedding_groups,
            "model_parallel": self.model_parallel_groups,
        }
        if kind not in builders:
            raise ValueError(f"unknown group kind {kind!r}; one of {', '.join(builders)}")
        return builders[kind]()

    def group_of(self, kind: str, rank: int) -> list[int] | None:
        """The ranks of the ``kind`` group containing ``rank``; None for a middle pipeline stage's
        embedding group (only the first and last stage hold embeddings)."""
        self._check_rank(rank)
        return next((g for g in self.groups(kind) if rank in g), None)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
