"""Layout-independent initialization.

Every parameter is drawn in full, in fp32, from a generator seeded by (seed, parameter name), then the
rank keeps its shard. So any tp/pp layout starts from exactly the weights of the single-device run,
which is what lets the tests compare layouts step by step.
"""

from __future__ import annotations

import hashlib

import torch


def param_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def normal_full(shape: tuple[int, ...], *, std: float, seed: int, name: str) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    return out.normal_(0.0, std, generator=param_generator(seed, name))


def shard_blocks(full: torch.Tensor, *, dim: int, sizes: tuple[int, ...], rank: int, world: int) -> torch.Tensor:
    """Rank's shard of ``full`` along ``dim`` when ``full`` is a concatenation of blocks of ``sizes``
    (e.g. [q; k; v] or [gate; up]): each block is split into ``world`` pieces and the rank's pieces
    are concatenated, so every rank holds whole heads of q, k and v."""
    pieces = []
    for block in torch.split(full, list(sizes), dim=dim):
        pieces.append(torch.chunk(block, world, dim=dim)[rank])
    return torch.cat(pieces, dim=dim).contiguous()


def unshard_blocks(shards: list[torch.Tensor], *, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`shard_blocks`: rebuild the full tensor from every rank's shard."""
    world = len(shards)
    local_sizes = [s // world for s in sizes]
    per_rank = [torch.split(s, local_sizes, dim=dim) for s in shards]
    blocks = [torch.cat([per_rank[r][b] for r in range(world)], dim=dim) for b in range(len(sizes))]
    return torch.cat(blocks, dim=dim)
