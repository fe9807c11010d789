"""Which stage-3 blocks stay gathered from their forward to their backward: DeepSpeed's
``stage3_max_reuse_distance`` and ``stage3_max_live_parameters`` over Trident's units. Pure index math
(no torch.distributed), so it is tested without processes.

The trace of one micro-batch on a rank is fixed: the outer unit (embedding; unit 0), the blocks 1..L in
forward order (chunk by chunk), the head (unit 0 again, on the rank that computes the loss), then the
blocks in reverse for backward. Between block u's forward and its backward the rank uses the later blocks
twice (forward and backward) and, where it computes the head, the outer unit: that many gathered elements
are its *reuse distance*

    distance(u) = 2 * sum(numel[u+1:]) + (numel[0] if the rank computes the head else 0)

(units counted whole, as they are gathered: one all-gather per unit; persistent parameters are never
gathered and count 0). DeepSpeed keeps a parameter gathered when it is used again within
``stage3_max_reuse_distance`` elements (distance < max, so 0 keeps nothing), which saves its backward
all-gather: the last block is the obvious one (its forward is followed by the head and then its own
backward). The distance falls with u, so the kept blocks are a suffix of the forward order.

``stage3_max_live_parameters`` caps the gathered elements alive at once. The kept blocks and the outer
unit (gathered for the whole micro-batch) are all alive at the turn from forward to backward, so the suffix
stops growing where ``numel[0] + sum(kept)`` would pass the cap; prefetching (engine/zero/stage3.py) stops
where the next gather would pass it. The unit being computed is always gathered, whatever the cap.
"""

from __future__ import annotations


def reuse_distances(numel: list[int], *, computes_head: bool) -> list[int]:
    """``distance(u)`` for every block u >= 1 (index 0, the outer unit, is -1: it is never released
    between its uses within a micro-batch)."""
    out = [-1] * len(numel)
    later = 0
    for u in range(len(numel) - 1, 0, -1):
        out[u] = 2 * later + (numel[0] if computes_head else 0)
        later += numel[u]
    return out


def kept_blocks(numel: list[int], *, computes_head: bool, max_reuse_distance: int, max_live: int) -> set[int]:
    """The blocks kept gathered from forward to backward: the longest suffix of blocks with a reuse distance
    below ``max_reuse_distance`` whose elements, with the outer unit's, fit in ``max_live``."""
    dist = reuse_distances(numel, computes_head=computes_head)
    kept: set[int] = set()
    live = numel[0] if numel else 0
    for u in range(len(numel) - 1, 0, -1):
        if numel[u] == 0:
            continue  # nothing gathered (all persistent): nothing to keep
        if dist[u] >= max_reuse_distance or live + numel[u] > max_live:
            break
        kept.add(u)
        live += numel[u]
    return kept
