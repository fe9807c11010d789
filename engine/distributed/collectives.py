"""Every collective in Trident goes through this module: one place for gloo/NCCL differences and for
counting communication.

Each function takes an explicit :class:`Group` (built by ``groups.py``). A group of size 1 returns at
once without touching ``torch.distributed``, so single-process runs need no process group at all.
Ranks passed *to* these functions (``src`` of broadcast, ``peer`` of send/recv) are **group-local**
indices (e.g. a pipeline stage inside the pp group), translated to global ranks here.

Byte convention of :class:`CommCounter` (payload bytes per rank, per call, ``numel * element_size``):

=====================  =====================================================
all_reduce             the tensor's bytes
all_gather_into_tensor the *output* (gathered) tensor's bytes
all_gather (list)      the sum of the output tensors' bytes
reduce_scatter_tensor  the *input* (unscattered) tensor's bytes
broadcast              the tensor's bytes (on every rank, sender included)
send / recv            each sent / received tensor's bytes
barrier                0 (counted as a call)
=====================  =====================================================

so all-reduce, all-gather and reduce-scatter of one full activation of B*S*H elements all count
B*S*H*element_size: the Megatron accounting (two all-reduces per layer forward = two reduce-scatters
+ two all-gathers with sequence parallelism) holds in bytes. Size-1 groups move nothing and count
nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor in favour of the *_single names;
# older torch only has the former. The choice is made here, once.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class CommCounter:
    """Bytes and calls per (collective, group kind). Owned by the trainer and passed in; never global."""

    def __init__(self, kinds: Sequence[str] = ()) -> None:
        self._kinds = tuple(kinds)
        self.reset()

    def reset(self) -> None:
        self._bytes: dict[tuple[str, str], int] = defaultdict(int)
        self._calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, op: str, kind: str, nbytes: int) -> None:
        self._bytes[(op, kind)] += nbytes
        self._calls[(op, kind)] += 1

    def snapshot(self) -> dict[str, int]:
        """Total bytes per group kind since the last reset, e.g. ``{"dp": .., "tp": .., "pp": ..}``:
        the ``comm_bytes`` entry of metrics.jsonl. Kinds given at construction appear even when 0."""
        out = dict.fromkeys(self._kinds, 0)
        for (_, kind), n in self._bytes.items():
            out[kind] = out.get(kind, 0) + n
        return out

    def detail(self) -> dict[tuple[str, str], int]:
        """Bytes per (collective, group kind)."""
        return dict(self._bytes)

    def calls(self) -> dict[tuple[str, str], int]:
        """Number of calls per (collective, group kind)."""
        return dict(self._calls)


@dataclass(frozen=True)
class Group:
    """A process group plus what Trident needs to know about it.

    ``kind`` names the parallel axis ("tp", "dp", "pp", "embedding", "model_parallel", "world");
    ``ranks`` are the global ranks in group order; ``rank`` is this process's index in ``ranks``.
    ``pg`` is None only for size-1 groups.
    """

    kind: str
    ranks: tuple[int, ...]
    rank: int
    pg: Any = None
    counter: CommCounter | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    @classmethod
    def single(cls, kind: str, global_rank: int = 0, counter: CommCounter | None = None) -> Group:
        return cls(kind=kind, ranks=(global_rank,), rank=0, pg=None, counter=counter)

    def _count(self, op: str, nbytes: int) -> None:
        if self.counter is not None:
            self.counter.add(op, self.kind, nbytes)


class Handle:
    """Wait handle of an asynchronous collective (already complete for size-1 groups)."""

    def __init__(self, works: Sequence[Any] = (), *, then: Callable[[], Any] | None = None) -> None:
        self._works = [w for w in works if w is not None]
        self._then = then  # local work that completes the collective once its transfers are done

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []
        if self._then is not None:
            then, self._then = self._then, None
            then()

    def is_completed(self) -> bool:
        """True once the transfers are done and no local completion step is pending (call ``wait()``)."""
        return self._then is None and all(w.is_completed() for w in self._works)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _op(name: str):
    if name not in _REDUCE_OPS:
        raise ValueError(f"unsupported reduction {name!r}; one of {', '.join(_REDUCE_OPS)}")
    return _REDUCE_OPS[name]


# --- all-reduce ----------------------------------------------------------------------------------------


def all_reduce_async(tensor: torch.Tensor, group: Group, *, op: str = "sum") -> Handle:
    """In-place all-reduce; wait on the handle before reading ``tensor``."""
    reduce_op = _op(op)
    if group.size == 1:
        return Handle()
    group._count("all_reduce", _nbytes(tensor))
    return Handle([dist.all_reduce(tensor, op=reduce_op, group=group.pg, async_op=True)])


def all_reduce(tensor: torch.Tensor, group: Group, *, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min); returns ``tensor``."""
    all_reduce_async(tensor, group, op=op).wait()
    return tensor


# --- all-gather / reduce-scatter along dim 0 -----------------------------------------------------------


def all_gather_into_tensor_async(output: torch.Tensor, input: torch.Tensor, group: Group) -> Handle:
    """``output`` (size * n, ...) = the ranks' ``input`` (n, ...) concatenated along dim 0."""
    if output.shape[0] != input.shape[0] * group.size or output.shape[1:] != input.shape[1:]:
        raise ValueError(f"all_gather output {tuple(output.shape)} != {group.size} x input {tuple(input.shape)}")
    if group.size == 1:
        output.copy_(input)
        return Handle()
    group._count("all_gather", _nbytes(output))
    return Handle([_all_gather_single(output, input, group=group.pg, async_op=True)])


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: Group) -> torch.Tensor:
    all_gather_into_tensor_async(output, input, group).wait()
    return output


def all_gather_in_pieces_async(output: torch.Tensor, input: torch.Tensor, group: Group, *, max_numel: int) -> Handle:
    """``all_gather_into_tensor_async`` of 1-D tensors as collectives of at most ``max_numel`` gathered
    elements each (DeepSpeed's ``allgather_bucket_size``; at least one element per rank): piece k gathers
    elements [k*c, (k+1)*c) of every rank's ``input`` (c = max_numel // size) into their places in
    ``output`` through the list form of all-gather, whose outputs are views. Counted like the whole."""
    n = input.numel()
    if output.dim() != 1 or input.dim() != 1 or output.numel() != n * group.size:
        raise ValueError(f"all_gather output {tuple(output.shape)} != {group.size} x input {tuple(input.shape)}")
    c = max(1, max_numel // group.size)
    if group.size == 1 or c >= n:
        return all_gather_into_tensor_async(output, input, group)
    works = []
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        outs = [output[r * n + lo : r * n + hi] for r in range(group.size)]
        group._count("all_gather", _nbytes(input[lo:hi]) * group.size)
        works.append(dist.all_gather(outs, input[lo:hi], group=group.pg, async_op=True))
    return Handle(works)


def reduce_scatter_tensor_async(output: torch.Tensor, input: torch.Tensor, group: Group, *, op: str = "sum") -> Handle:
    """``output`` (n, ...) = this rank's dim-0 slice of the sum over ranks of ``input`` (size * n, ...)."""
    reduce_op = _op(op)
    if input.shape[0] != output.shape[0] * group.size or output.shape[1:] != input.shape[1:]:
        raise ValueError(f"reduce_scatter input {tuple(input.shape)} != {group.size} x output {tuple(output.shape)}")
    if group.size == 1:
        output.copy_(input)
        return Handle()
    group._count("reduce_scatter", _nbytes(input))
    if op == "sum" and dist.get_backend(group.pg) == "gloo" and input.is_contiguous():
        # gloo's reduce-scatter costs milliseconds per call whatever the size (torch 2.13, 2 ranks: 3-4 ms
        # for 2K fp32, 6-8 ms for 860K); an all-to-all of the input's pieces plus a local sum over the
        # received pieces moves the same bytes 2-4x faster. Ranks are summed in group order.
        pieces = torch.empty_like(input)
        work = dist.all_to_all_single(pieces, input, group=group.pg, async_op=True)
        return Handle([work], then=lambda: torch.sum(pieces.view(group.size, *output.shape), dim=0, out=output))
    return Handle([_reduce_scatter_single(output, input, op=reduce_op, group=group.pg, async_op=True)])


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group: Group, *, op: str = "sum") -> torch.Tensor:
    reduce_scatter_tensor_async(output, input, group, op=op).wait()
    return output


def reduce_scatter_uneven_async(
    output: torch.Tensor, input: torch.Tensor, splits: Sequence[int], group: Group
) -> Handle:
    """Sum-reduce-scatter with per-rank sizes: ``input`` (1-D) is the concatenation over ranks q of the
    ``splits[q]`` elements destined to q (the same ``splits`` on every rank), and ``output`` (``splits[rank]``
    elements) receives the sum over ranks of their parts for this rank. Neither gloo nor NCCL has a
    reduce-scatter-v: an all-to-all with those splits plus a local sum in group order, counted as a
    reduce-scatter of ``input``."""
    if input.dim() != 1 or input.numel() != sum(splits) or len(splits) != group.size:
        raise ValueError(f"reduce_scatter input of {input.numel()} elements != splits {list(splits)}")
    n = splits[group.rank]
    if output.numel() != n:
        raise ValueError(f"reduce_scatter output of {output.numel()} elements != this rank's split {n}")
    if group.size == 1:
        output.copy_(input)
        return Handle()
    group._count("reduce_scatter", _nbytes(input))
    pieces = torch.empty(group.size * n, dtype=input.dtype, device=input.device)
    work = dist.all_to_all_single(
        pieces,
        input,
        output_split_sizes=[n] * group.size,
        input_split_sizes=list(splits),
        group=group.pg,
        async_op=True,
    )
    return Handle([work], then=lambda: torch.sum(pieces.view(group.size, n), dim=0, out=output))


def all_gather(tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group order."""
    if group.size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(group.size)]
    group._count("all_gather", _nbytes(tensor) * group.size)
    dist.all_gather(out, tensor.contiguous(), group=group.pg)
    return out


# --- broadcast, barrier --------------------------------------------------------------------------------


def broadcast_async(tensor: torch.Tensor, group: Group, *, src: int = 0) -> Handle:
    """Copy ``tensor`` from group-local rank ``src`` to every rank of the group, in place."""
    if not 0 <= src < group.size:
        raise ValueError(f"broadcast src {src} outside group of size {group.size}")
    if group.size == 1:
        return Handle()
    group._count("broadcast", _nbytes(tensor))
    return Handle([dist.broadcast(tensor, src=group.ranks[src], group=group.pg, async_op=True)])


def broadcast(tensor: torch.Tensor, group: Group, *, src: int = 0) -> torch.Tensor:
    broadcast_async(tensor, group, src=src).wait()
    return tensor


def barrier(group: Group) -> None:
    if group.size == 1:
        return
    group._count("barrier", 0)
    dist.barrier(group=group.pg)


# --- point-to-point (pipeline) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    tensor: torch.Tensor
    peer: int  # group-local rank (pipeline stage)


@dataclass(frozen=True)
class Recv:
    tensor: torch.Tensor  # filled in place
    peer: int


def batch_send_recv_async(ops: Sequence[Send | Recv], group: Group) -> Handle:
    """Post ``ops`` together (``batch_isend_irecv``). Between two ranks, messages match in posting order.

    With NCCL the first batch on a group must include every rank of it; the pipeline executor's first
    exchange does (see engine/pipeline/schedules.py for how sends and receives are paired).
    """
    if not ops:
        return Handle()
    p2p = []
    for item in ops:
        if not 0 <= item.peer < group.size or item.peer == group.rank:
            raise ValueError(
                f"p2p peer {item.peer} invalid in {group.kind} group of size {group.size} (self {group.rank})"
            )
        is_send = isinstance(item, Send)
        group._count("send" if is_send else "recv", _nbytes(item.tensor))
        p2p.append(
            dist.P2POp(dist.isend if is_send else dist.irecv, item.tensor, group.ranks[item.peer], group=group.pg)
        )
    return Handle(dist.batch_isend_irecv(p2p))


def batch_send_recv(ops: Sequence[Send | Recv], group: Group) -> None:
    batch_send_recv_async(ops, group).wait()
