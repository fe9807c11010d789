"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019, section 3).

``ColumnParallelLinear`` splits the output features (Y_i = X A_i), ``RowParallelLinear`` the input
features (Y = sum_i X_i A_i, summed by the ``g`` all-reduce), ``VocabParallelEmbedding`` the vocabulary.
With ``group=None`` (or a size-1 group) each is an ordinary layer and no collective is issued.
Parameters carry ``tp_dim`` / ``tp_sizes`` (how to gather them) or ``tp_replicated`` (same on every TP
rank: counted once in the gradient norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.tensor_parallel import mappings
from engine.tensor_parallel.init import normal_full, shard_blocks


def group_size(group) -> int:
    return 1 if group is None else group.size


def group_rank(group) -> int:
    return 0 if group is None else group.rank


def _mark(param: nn.Parameter, *, dim: int | None, sizes: tuple[int, ...] | None = None) -> nn.Parameter:
    param.tp_dim = dim
    param.tp_sizes = sizes
    param.tp_replicated = dim is None
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split across TP ranks.

    ``blocks`` lists the sizes of concatenated sub-matrices (e.g. q, k, v) so each is split separately.
    Input: (..., in) replicated, or (S/tp, B, in) sequence-sharded with ``sequence_parallel``.
    Output: (..., out/tp) local.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        name: str,
        seed: int,
        std: float,
        bias: bool,
        group=None,
        blocks: tuple[int, ...] | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        world, rank = group_size(group), group_rank(group)
        self.blocks = blocks or (out_features,)
        if sum(self.blocks) != out_features or any(b % world for b in self.blocks):
            raise ValueError(f"{name}: blocks {self.blocks} must sum to {out_features} and divide by tp={world}")
        full = normal_full((out_features, in_features), std=std, seed=seed, name=f"{name}.weight")
        local = shard_blocks(full, dim=0, sizes=self.blocks, rank=rank, world=world)
        self.weight = _mark(nn.Parameter(local), dim=0, sizes=self.blocks)
        if bias:
            self.bias = _mark(nn.Parameter(torch.zeros(out_features // world)), dim=0, sizes=self.blocks)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, *, skip_bias_add: bool = False) -> torch.Tensor:
        """``skip_bias_add``: return x A^T only; the caller adds ``self.bias`` (fused into what follows)."""
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_region(x, self.group)  # (S, B, in)
        else:
            x = mappings.copy_to_tensor_region(x, self.group)  # f: identity fwd, all-reduce bwd
        return F.linear(x, self.weight, None if skip_bias_add else self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_i x_i A_i^T + b with A's columns (input features) split across TP ranks.

    Input (..., in/tp) local; output (..., out) summed over ranks (``g``), or reduce-scattered along the
    sequence with ``sequence_parallel``. The bias is replicated and added once, after the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        name: str,
        seed: int,
        std: float,
        bias: bool,
        group=None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        world, rank = group_size(group), group_rank(group)
        self.world = world
        if in_features % world:
            raise ValueError(f"{name}: in_features {in_features} not divisible by tp={world}")
        full = normal_full((out_features, in_features), std=std, seed=seed, name=f"{name}.weight")
        local = shard_blocks(full, dim=1, sizes=(in_features,), rank=rank, world=world)
        self.weight = _mark(nn.Parameter(local), dim=1, sizes=(in_features,))
        if bias:
            self.bias = _mark(nn.Parameter(torch.zeros(out_features)), dim=None)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            # nothing to sum: the bias goes into the GEMM's epilogue instead of a separate add
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_region(y, self.group)
        else:
            y = mappings.reduce_from_tensor_region(y, self.group)  # g: all-reduce fwd, identity bwd
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across TP ranks; rows past ``vocab_size`` are padding.

    Each rank looks up the ids in its range (others give zeros) and the partial results are summed
    (all-reduce, or reduce-scatter along the sequence with ``sequence_parallel``).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        padded_vocab: int,
        name: str,
        seed: int,
        std: float,
        group=None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        world, rank = group_size(group), group_rank(group)
        self.vocab_size = vocab_size
        self.per_rank = padded_vocab // world
        self.start = rank * self.per_rank
        full = torch.zeros(padded_vocab, dim)
        full[:vocab_size] = normal_full((vocab_size, dim), std=std, seed=seed, name=f"{name}.weight")
        local = full[self.start : self.start + self.per_rank].clone()
        self.weight = _mark(nn.Parameter(local), dim=0, sizes=(padded_vocab,))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_region(out, self.group)
        return mappings.reduce_from_tensor_region(out, self.group)
