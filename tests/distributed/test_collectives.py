"""Collectives on 2 and 4 gloo ranks: values equal the single-process reference, bytes follow the
documented convention (all-reduce = tensor bytes, all-gather = output bytes, reduce-scatter = input
bytes, p2p = bytes per tensor sent/received), and size-1 groups never touch torch.distributed."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.distributed import collectives as C
from engine.distributed.collectives import CommCounter, Group
from engine.distributed.groups import ProcessGroups
from tests.multiproc import RankFailed, run_ranks


def _collective_checks(rank: int, world: int, _args) -> dict:
    import torch.distributed as dist

    counter = CommCounter(kinds=("dp", "tp", "pp"))
    g = Group(kind="dp", ranks=tuple(range(world)), rank=rank, pg=dist.group.WORLD, counter=counter)
    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = torch.tensor([rank + 1.0, 2.0 * (rank + 1)])
        out["sum"] = C.all_reduce(t, g).tolist()
        out["max"] = C.all_reduce(torch.tensor([float(rank), -float(rank)]), g, op="max").tolist()
        out["bf16"] = C.all_reduce(torch.full((4,), rank + 1.0, dtype=torch.bfloat16), g).float().tolist()
        gathered = torch.empty(3 * world)
        out["gather"] = C.all_gather_into_tensor(gathered, torch.arange(3.0) + 10 * rank, g).tolist()
        shard = torch.empty(2)
        out["scatter"] = C.reduce_scatter_tensor(shard, torch.arange(2.0 * world) * (rank + 1), g).tolist()
        out["gather_list"] = [x.tolist() for x in C.all_gather(torch.tensor([rank * 1.0]), g)]
        b = torch.tensor([rank * 1.0, 7.0])
        out["bcast"] = C.broadcast(b, g, src=1).tolist()
        h = C.all_reduce_async(torch.ones(5), g)
        h.wait()
        recv = torch.empty(3)
        C.batch_send_recv(
            [C.Send(torch.full((3,), float(rank)), (rank + 1) % world), C.Recv(recv, (rank - 1) % world)], g
        )
        out["ring"] = recv.tolist()
        C.barrier(g)
    out["deprecations"] = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    out["detail"] = counter.detail()
    out["calls"] = counter.calls()
    out["snapshot"] = counter.snapshot()
    counter.reset()
    out["after_reset"] = counter.snapshot()
    return out


def _expected_bytes(world: int) -> dict[tuple[str, str], int]:
    f32 = 4
    return {
        ("all_reduce", "dp"): 2 * f32 + 4 * 2 + 4 * 2 + 5 * f32,  # sum, max, bf16 (2 bytes each), async
        ("all_gather", "dp"): 3 * world * f32 + world * f32,  # into_tensor output + list output
        ("reduce_scatter", "dp"): 2 * world * f32,  # input bytes
        ("broadcast", "dp"): 2 * f32,
        ("send", "dp"): 3 * f32,
        ("recv", "dp"): 3 * f32,
        ("barrier", "dp"): 0,
    }


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_values_and_bytes(world: int) -> None:
    results = run_ranks(_collective_checks, world)
    n = world
    for rank, out in enumerate(results):
        assert out["sum"] == [n * (n + 1) / 2, n * (n + 1)]
        assert out["max"] == [n - 1.0, 0.0]
        assert out["bf16"] == [n * (n + 1) / 2] * 4
        assert out["gather"] == [float(x + 10 * r) for r in range(n) for x in range(3)]
        total = [float(x) * n * (n + 1) / 2 for x in range(2 * n)]  # sum over ranks of arange * (r+1)
        assert out["scatter"] == total[2 * rank : 2 * rank + 2]
        assert out["gather_list"] == [[float(r)] for r in range(n)]
        assert out["bcast"] == [1.0, 7.0]  # group-local src 1
        assert out["ring"] == [float((rank - 1) % n)] * 3
        assert out["detail"] == _expected_bytes(n)
        assert out["calls"][("all_reduce", "dp")] == 4
        assert out["snapshot"] == {"dp": sum(_expected_bytes(n).values()), "tp": 0, "pp": 0}
        assert out["after_reset"] == {"dp": 0, "tp": 0, "pp": 0}
        assert out["deprecations"] == []


def test_size_one_groups_short_circuit_without_process_group() -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    counter = CommCounter(kinds=("tp",))
    groups = ProcessGroups.single(counter)
    t = torch.tensor([3.0, 4.0])
    assert C.all_reduce(t, groups.tp).tolist() == [3.0, 4.0]
    out = torch.empty(2)
    assert C.all_gather_into_tensor(out, t, groups.dp).tolist() == [3.0, 4.0]
    assert C.reduce_scatter_tensor(torch.empty(2), t, groups.pp).tolist() == [3.0, 4.0]
    assert [x.tolist() for x in C.all_gather(t, groups.world)] == [[3.0, 4.0]]
    C.barrier(groups.model_parallel)
    C.batch_send_recv([], groups.pp)
    assert counter.snapshot() == {"tp": 0}  # nothing moved, nothing counted
    assert (groups.tp.size, groups.tp.rank, groups.tp.global_rank) == (1, 0, 0)


def test_shape_mismatch_is_refused() -> None:
    g = Group.single("tp")
    with pytest.raises(ValueError, match=r"all_gather output \(3,\) != 1 x input \(2,\)"):
        C.all_gather_into_tensor(torch.empty(3), torch.empty(2), g)


def _raises_on_rank_one(rank: int, world: int, _args) -> int:
    if rank == 1:
        raise KeyError("boom on purpose")
    return rank


def _hangs(rank: int, world: int, _args) -> None:
    import time

    time.sleep(60)


def test_helper_propagates_a_rank_traceback() -> None:
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 raised:.*KeyError: 'boom on purpose'"):
        run_ranks(_raises_on_rank_one, 2)


def test_helper_times_out_instead_of_hanging() -> None:
    with pytest.raises(RankFailed, match=r"timed out after 4 s; ranks \[0, 1\] did not finish"):
        run_ranks(_hangs, 2, timeout_s=4)
