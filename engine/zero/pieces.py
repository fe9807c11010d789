"""Reduce pieces: the parts of a ZeRO bucket that backward completes one after another.

A bucket (engine/zero/buckets.py) is laid out by weight-decay class and TP replication, not in the order
backward produces gradients, and with DeepSpeed's default ``reduce_bucket_size`` (5e8) the whole model is
one bucket: reduce-scattered as one collective, it cannot start before backward ends. Under
``overlap_comm`` a stage 2-3 bucket is therefore reduced piece by piece, one piece per unit (the outer
parameters, each transformer block: engine/zero/factory.py) that has parameters in it, as soon as backward
has produced the gradients of that unit. A piece covers a few ranges of the bucket (its parameters, merged
where adjacent; the last piece also the bucket's padding, so a step still moves the whole padded bucket),
which straddle the ranks' shards unevenly: it is reduce-scattered with per-rank sizes ``splits`` (an
all-to-all plus a local sum, engine/dist/collectives.py), and this rank receives the sum of its ``mine``
segments. Because shards are contiguous and in rank order, the piece's elements in bucket order are already
grouped by destination rank: the send buffer is just the ranges concatenated. Pure index math, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReducePiece:
    members: tuple[int, ...]  # indices into the bucket's named_params
    ranges: tuple[tuple[int, int], ...]  # bucket ranges in bucket order, adjacent members merged
    positions: tuple[int, ...]  # each member's offset in the piece's send buffer (the ranges concatenated)
    splits: tuple[int, ...]  # elements of the piece in each rank's shard
    mine: tuple[tuple[int, int, int], ...]  # (shard-local lo, hi, offset in the received sum) for this rank
    whole: bool  # the piece is the whole padded bucket: an even reduce-scatter in place

    @property
    def numel(self) -> int:
        return sum(b - a for a, b in self.ranges)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def plan_pieces(offsets: list[int], sizes: list[int], units: list[int], *, padded_numel: int, dp_size: int,
                dp_rank: int) -> list[ReducePiece]:
    """The pieces of one bucket, in the order backward completes them (highest unit first): member i sits
    at ``offsets[i]`` with ``sizes[i]`` elements and belongs to unit ``units[i]``. One piece when all the
    members share a unit."""
    shard = padded_numel // dp_size
    numel = max((o + s for o, s in zip(offsets, sizes)), default=0)
    order = sorted(set(units), reverse=True)
    pieces = []
    for k, unit in enumerate(order):
        members = [i for i, u in enumerate(units) if u == unit]
        ranges = [(offsets[i], offsets[i] + sizes[i]) for i in members]
        if k == len(order) - 1 and numel < padded_numel:
            ranges.append((numel, padded_numel))  # the padding travels with the last piece
        ranges = _merge(ranges)
        starts, pos = [], 0
        for a, b in ranges:
            starts.append(pos)
            pos += b - a
        positions = []
        for i in members:
            j = max(j for j, (a, _) in enumerate(ranges) if a <= offsets[i])
            positions.append(starts[j] + offsets[i] - ranges[j][0])
        splits = [sum(max(0, min(b, (q + 1) * shard) - max(a, q * shard)) for a, b in ranges) for q in range(dp_size)]
        lo, hi = dp_rank * shard, (dp_rank + 1) * shard
        mine, got = [], 0
        for a, b in ranges:
            x, y = max(a, lo), min(b, hi)
            if x < y:
                mine.append((x - lo, y - lo, got))
                got += y - x
        pieces.append(ReducePiece(members=tuple(members), ranges=tuple(ranges), positions=tuple(positions),
                                  splits=tuple(splits), mine=tuple(mine),
                                  whole=ranges == [(0, padded_numel)]))
    return pieces
