"""ProcessGroups for dp=2 x tp=2 x pp=2 on 8 gloo ranks (one spawn): each rank's groups hold exactly
the topology's ranks, and an all-reduce over each group sums exactly its members."""

from __future__ import annotations

import torch

from engine.distributed import collectives as C
from engine.distributed.collectives import CommCounter
from engine.distributed.groups import ProcessGroups
from engine.distributed.topology import Topology
from tests.multiproc import run_ranks

KINDS = ("tp", "dp", "pp", "embedding", "model_parallel", "world")


def _group_checks(rank: int, world: int, _args) -> dict:
    counter = CommCounter(kinds=("tp", "dp", "pp"))
    groups = ProcessGroups.build(Topology(world, tp=2, pp=2), rank=rank, counter=counter)
    out = {}
    for kind in KINDS:
        g = getattr(groups, kind)
        # all-reduce of the global rank: the sum of the group's members, so a wrong group shows
        out[kind] = (g.ranks, g.rank, int(C.all_reduce(torch.tensor([float(rank)]), g).item()))
    out["bytes"] = counter.snapshot()
    return out


def test_groups_match_topology_on_8_ranks() -> None:
    topo = Topology(8, tp=2, pp=2)
    results = run_ranks(_group_checks, 8)
    for rank, out in enumerate(results):
        for kind in KINDS:
            ranks, local, total = out[kind]
            expected = tuple(range(8)) if kind == "world" else tuple(topo.group_of(kind, rank))
            assert ranks == expected, (rank, kind)
            assert ranks[local] == rank
            assert total == sum(expected)
        # one fp32 element per all-reduce; embedding and model_parallel kinds count under their own name
        assert out["bytes"] == {"tp": 4, "dp": 4, "pp": 4, "embedding": 4, "model_parallel": 4, "world": 4}
    # Spot-check Megatron's order (tp fastest, then dp, then pp) on rank 5 = (pp 1, dp 0, tp 1).
    assert results[5]["tp"][0] == (4, 5)
    assert results[5]["dp"][0] == (5, 7)
    assert results[5]["pp"][0] == (1, 5)
