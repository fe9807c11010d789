"""The pure rank grid: Megatron's order (tp fastest, then dp, then pp) and refused layouts."""

from __future__ import annotations

import pytest

from engine.distributed.topology import Coord, Topology
from engine.errors import ConfigError


def test_rank_order_tp_fastest_then_dp_then_pp() -> None:
    topo = Topology(16, tp=2, pp=2)
    assert topo.dp == 4
    assert [topo.coords(r) for r in (0, 1, 2, 7, 8, 15)] == [
        Coord(dp=0, pp=0, tp=0),
        Coord(dp=0, pp=0, tp=1),
        Coord(dp=1, pp=0, tp=0),
        Coord(dp=3, pp=0, tp=1),
        Coord(dp=0, pp=1, tp=0),
        Coord(dp=3, pp=1, tp=1),
    ]
    for r in range(16):
        c = topo.coords(r)
        assert topo.rank(dp=c.dp, pp=c.pp, tp=c.tp) == r


def test_groups_of_dp2_tp2_pp2() -> None:
    topo = Topology(8, tp=2, pp=2)
    assert topo.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (8, 8, 1), (8, 1, 8), (24, 2, 3), (16, 4, 2)])
def test_each_kind_partitions_the_world(world: int, tp: int, pp: int) -> None:
    topo = Topology(world, tp=tp, pp=pp)
    for kind, size in (("tp", tp), ("dp", topo.dp), ("pp", pp), ("model_parallel", tp * pp)):
        groups = topo.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(world)), kind
        assert {len(g) for g in groups} == {size}, kind


def test_embedding_group_is_first_and_last_stage() -> None:
    topo = Topology(8, tp=2, pp=4)
    assert topo.embedding_groups() == [[0, 6], [1, 7]]
    assert topo.group_of("embedding", 2) is None  # a middle stage holds no embedding
    assert Topology(4, tp=2, pp=1).embedding_groups() == [[0], [1], [2], [3]]


def test_indivisible_world_is_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        Topology(6, tp=4, pp=1)
    assert str(err.value) == (
        "world size 6 is not divisible by parallel.tensor=4 x parallel.pipeline=1 = 4 "
        "(hint: launch a multiple of tensor x pipeline processes, or change the parallel sizes)"
    )
    with pytest.raises(ConfigError, match=r"parallel.pipeline must be a positive integer, got 0"):
        Topology(4, tp=1, pp=0)
