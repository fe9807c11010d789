"""The communication operators of tensor and sequence parallelism, as small autograd functions.

Megatron-LM (Shoeybi et al. 2019, fig. 3) names two conjugate operators:
  f = copy_to_tensor_region:     identity forward, all-reduce backward (before a column-parallel layer);
  g = reduce_from_tensor_region: all-reduce forward, identity backward (after a row-parallel layer).
Sequence parallelism (Korthikanti et al. 2022) replaces them at the same boundaries with
  gather_from_sequence_region:     all-gather along the sequence forward, reduce-scatter backward;
  reduce_scatter_to_sequence_region: reduce-scatter forward, all-gather backward.
Activations are (S, B, H) so the sequence is dim 0 and shards are contiguous.
With ``group`` None or of size 1 every operator is the identity.
"""

from __future__ import annotations

import torch

from engine.distributed import collectives


def _trivial(group) -> bool:
    return group is None or group.size == 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    collectives.all_reduce(x, group=group)
    return x


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * group.size, *x.shape[1:]))
    collectives.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    if x.shape[0] % group.size:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by tp={group.size}")
    out = x.new_empty((x.shape[0] // group.size, *x.shape[1:]))
    collectives.reduce_scatter_tensor(out, x, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's slice of a replicated (S, ...) tensor; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        chunk = x.shape[0] // group.size
        return x[group.rank * chunk : (group.rank + 1) * chunk].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def copy_to_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _CopyToRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ReduceFromRegion.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ScatterToSequence.apply(x, group)
