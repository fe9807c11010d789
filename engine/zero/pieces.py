"""Reduce pieces: the parts of a ZeRO bucket that backward completes one after another.

A bucket (engine/zero/buckets.py) is laid out by weight-decay class and TP replication, not in the order
backward produces gradients, and with DeepSpeed's default ``reduce_bucket_size`` (5e8) the whole model is
one bucket: reduce-scattered as one collective, it cannot start before backward ends. Under
``overlap_comm`` a stage 2 model is therefore one bucket (engine/zero/factory.py) reduced piece by piece,
as soon as backward has produced a piece's gradients: a piece is a run of whole units (the outer parameters,
each transformer block) of at most ``reduce_bucket_size`` elements, DeepSpeed's "elements reduced at a
time". With DeepSpeed's default (5e8) a small model is one piece, reduced once like stage 1; a smaller
``reduce_bucket_size`` overlaps the reduction with backward block by block and bounds the transient
gradient memory to the pieces in flight. (Stage 3 buckets are one unit each already.)

A piece covers a few ranges of the bucket (its parameters, merged where adjacent; the last piece also
the bucket's padding, so a step still moves the whole padded bucket),
which straddle the ranks' shards unevenly: it is reduce-scattered with per-rank sizes ``splits`` (an
all-to-all plus a local sum, engine/distributed/collectives.py), and this rank receives the sum of its ``mine``
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


def group_units(sizes: list[int], units: list[int], max_numel: int) -> list[int]:
    """Merge whole units, in backward order (highest unit first), into groups of at most ``max_numel``
    elements (a unit larger than that is a group of its own): DeepSpeed's ``reduce_bucket_size``, the
    number of elements reduced at a time. Returns each member's group, numbered so that the group backward
    completes first has the highest number."""
    unit_numel: dict[int, int] = {}
    for u, size in zip(units, sizes):
        unit_numel[u] = unit_numel.get(u, 0) + size
    group_of, group, fill = {}, 0, 0
    for u in sorted(unit_numel, reverse=True):
        if fill and fill + unit_numel[u] > max_numel:
            group, fill = group + 1, 0
        group_of[u] = group
        fill += unit_numel[u]
    return [-group_of[u] for u in units]


def plan_pieces(
    offsets: list[int],
    sizes: list[int],
    units: list[int],
    *,
    padded_numel: int,
    dp_size: int,
    dp_rank: int,
    max_numel: int | None = None,
) -> list[ReducePiece]:
    """The pieces of one bucket, in the order backward completes them (highest unit first): member i sits
    at ``offsets[i]`` with ``sizes[i]`` elements and belongs to unit ``units[i]``. One piece when all the
    members share a unit. With ``max_numel``, consecutive units are merged into pieces of at most that many
    elements (see :func:`group_units`)."""
    if max_numel is not None:
        units = group_units(sizes, units, max_numel)
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
        pieces.append(
            ReducePiece(
                members=tuple(members),
                ranges=tuple(ranges),
                positions=tuple(positions),
                splits=tuple(splits),
                mine=tuple(mine),
                whole=ranges == [(0, padded_numel)],
            )
        )
    return pieces
