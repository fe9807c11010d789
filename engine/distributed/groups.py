"""Build every process group once, from the topology; the only caller of ``new_group`` in Trident.

``new_group`` is collective over the whole world: every rank must create every group, in the same order,
even the groups it is not in. ``ProcessGroups.build`` walks ``topology.GROUP_KINDS`` in a fixed order and
keeps the group containing this rank. Groups of size 1 (e.g. tp when tensor=1) are never created, which
is consistent across ranks because every group of one kind has the same size. Identical rank lists are
created once and shared (e.g. embedding == pp when pp == 2, model_parallel == world when dp == 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.distributed.collectives import CommCounter, Group
from engine.distributed.topology import GROUP_KINDS, Topology


@dataclass(frozen=True)
class ProcessGroups:
    topology: Topology
    rank: int
    tp: Group
    dp: Group
    pp: Group
    embedding: Group | None  # None on middle pipeline stages (they hold no embedding)
    model_parallel: Group
    world: Group

    @classmethod
    def build(cls, topology: Topology, *, rank: int, counter: CommCounter | None = None) -> ProcessGroups:
        """Create all groups (call on every rank, after ``init_process_group``)."""
        import torch.distributed as dist  # noqa: PLC0415 - single() must work without a process group

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroups.build needs torch.distributed initialised; use single() for one process")
        if dist.get_world_size() != topology.world_size:
            raise RuntimeError(f"process group has {dist.get_world_size()} ranks, {topology!r} expects another")
        world_ranks = tuple(range(topology.world_size))
        created: dict[tuple[int, ...], object] = {world_ranks: dist.group.WORLD}
        mine: dict[str, Group | None] = {}
        for kind in GROUP_KINDS:
            mine[kind] = None
            for ranks in topology.groups(kind):
                key = tuple(ranks)
                if len(key) > 1 and key not in created:
                    created[key] = dist.new_group(list(key))
                if rank in key:
                    mine[kind] = Group(kind=kind, ranks=key, rank=key.index(rank), pg=created.get(key), counter=counter)
        return cls(
            topology=topology,
            rank=rank,
            tp=mine["tp"],
            dp=mine["dp"],
            pp=mine["pp"],
            embedding=mine["embedding"],
            model_parallel=mine["model_parallel"],
            world=Group(kind="world", ranks=world_ranks, rank=rank, pg=dist.group.WORLD, counter=counter),
        )

    @classmethod
    def single(cls, counter: CommCounter | None = None) -> ProcessGroups:
        """World size 1: every group has one member; torch.distributed is never touched."""
        groups = {kind: Group.single(kind, 0, counter) for kind in (*GROUP_KINDS, "world")}
        return cls(topology=Topology(1), rank=0, **groups)
