"""Split L transformer layers into pipeline stages: pure logic, no torch.

The model is cut into ``p * v`` contiguous *model chunks* (``v`` = virtual stages per device). Model chunk
``k`` lives on device ``k % p`` as its local chunk ``k // p``, so device ``d`` holds chunks ``d, d+p,
d+2p, ...`` (Megatron-LM's interleaving; with v = 1 each device holds one contiguous slice). The
embedding sits on model chunk 0 (device 0) and the head and loss on the last (device p-1).

Balancing minimises the heaviest chunk (the pipeline runs at the pace of its slowest stage); among
the cuts that achieve it, the one with the smallest sum of squared chunk weights, ties going to
earlier chunks holding more. Weights are per-layer parameter counts ("parameters", with the embedding
and head counted on their chunks) or 1 per layer ("layers").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import ConfigError


@dataclass(frozen=True)
class Chunk:
    """One model chunk: layers ``[start, stop)`` on ``device`` as its local chunk ``local``."""

    index: int
    device: int
    local: int
    start: int
    stop: int
    has_embedding: bool
    has_head: bool

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class Partition:
    n_layers: int
    stages: int
    virtual_stages: int
    chunks: tuple[Chunk, ...]  # in model order

    def chunks_of(self, device: int) -> list[Chunk]:
        """The chunks device ``device`` holds, by local index."""
        if not 0 <= device < self.stages:
            raise ValueError(f"device {device} outside [0, {self.stages})")
        return [c for c in self.chunks if c.device == device]

    def sizes(self) -> list[int]:
        return [c.stop - c.start for c in self.chunks]


def _balanced_cuts(weights: Sequence[float], parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous non-empty pieces of ``weights`` (see the module docstring)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def piece(i: int, j: int) -> float:
        return prefix[j] - prefix[i]

    # 1) the smallest achievable maximum: best[k][j] = min over cuts of the first j items into k pieces.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            best[k][j] = min(max(best[k - 1][i], piece(i, j)) for i in range(k - 1, j))
    bound = best[parts][n]
    # 2) among cuts under that bound, the smallest sum of squares; walk back preferring long early pieces.
    sq = [[inf] * (n + 1) for _ in range(parts + 1)]
    sq[0][0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            sq[k][j] = min(
                (sq[k - 1][i] + piece(i, j) ** 2 for i in range(k - 1, j) if piece(i, j) <= bound),
                default=inf,
            )
    sizes, j = [], n
    for k in range(parts, 0, -1):
        # the last piece as short as possible (earlier pieces longer), among optimal choices
        i = max(
            i
            for i in range(k - 1, j)
            if piece(i, j) <= bound and abs(sq[k - 1][i] + piece(i, j) ** 2 - sq[k][j]) <= 1e-9 * max(1.0, sq[k][j])
        )
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def partition_layers(
    n_layers: int,
    *,
    stages: int,
    virtual_stages: int = 1,
    method: str = "layers",
    layer_params: Sequence[int] | None = None,
    embedding_params: int = 0,
    head_params: int = 0,
) -> Partition:
    """Assign ``n_layers`` layers to ``stages * virtual_stages`` model chunks.

    ``method="layers"`` balances layer counts; ``"parameters"`` balances ``layer_params`` (one count per
    layer) plus ``embedding_params`` on the first chunk and ``head_params`` on the last.
    """
    if stages < 1 or virtual_stages < 1:
        raise ConfigError(f"parallel.pipeline={stages} and parallel.virtual_stages={virtual_stages} must be at least 1")
    parts = stages * virtual_stages
    if parts > n_layers:
        raise ConfigError(
            f"model.n_layers={n_layers} cannot fill parallel.pipeline={stages} x parallel.virtual_stages="
            f"{virtual_stages} = {parts} pipeline chunks (each needs at least one layer)",
            hint=f"use at most {n_layers} stages x virtual stages, or more layers",
        )
    if method == "layers":
        weights: list[float] = [1.0] * n_layers
    elif method == "parameters":
        if layer_params is None or len(layer_params) != n_layers:
            got = "none" if layer_params is None else len(layer_params)
            raise ValueError(f"method='parameters' needs {n_layers} layer parameter counts, got {got}")
        weights = [float(w) for w in layer_params]
        weights[0] += embedding_params
        weights[-1] += head_params
    else:
        raise ConfigError(f"unknown partition method {method!r}", hint="'layers' or 'parameters'")
    sizes = _balanced_cuts(weights, parts)
    chunks, start = [], 0
    for k, size in enumerate(sizes):
        chunks.append(
            Chunk(
                index=k,
                device=k % stages,
                local=k // stages,
                start=start,
                stop=start + size,
                has_embedding=k == 0,
                has_head=k == parts - 1,
            )
        )
        start += size
    return Partition(n_layers=n_layers, stages=stages, virtual_stages=virtual_stages, chunks=tuple(chunks))
