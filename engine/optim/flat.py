"""Contiguous fp32 buffers for one optimizer group: master weights, accumulated gradients, Adam moments.

Parameters are packed in a fixed order, TP-sharded ones first and TP-replicated ones (norm weights,
row-parallel biases) last, so the gradient norm counts the replicated tail once per TP group by
slicing instead of masking. ZeRO (engine/zero) shards the same layout across data-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatLayout:
    """Where each parameter sits in one flat buffer; holds no storage of its own.

    ``numel`` counts the parameters, ``padded_numel`` rounds it up to a multiple of ``pad_to`` (the DP
    size under ZeRO, so every rank owns an equal shard)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, pad_to: int = 1) -> None:
        sharded = [(n, p) for n, p in named_params if not getattr(p, "tp_replicated", False)]
        replicated = [(n, p) for n, p in named_params if getattr(p, "tp_replicated", False)]
        self.named_params = sharded + replicated
        self.offsets: list[int] = []
        offset = 0
        for _, p in self.named_params:
            self.offsets.append(offset)
            offset += p.numel()
        # Shapes as built: stage 3 later swaps the parameters' storage for empty placeholders.
        self.shapes = [p.shape for _, p in self.named_params]
        self.replicated_start = sum(p.numel() for _, p in sharded)
        self.numel = offset
        self.padded_numel = -(-offset // pad_to) * pad_to if offset else 0

    def views(self, flat: torch.Tensor):
        """(param, view of ``flat`` shaped like param) pairs."""
        for (_, p), off, shape in zip(self.named_params, self.offsets, self.shapes):
            yield p, flat[off:off + shape.numel()].view(shape)


class FlatGroup(FlatLayout):
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, weight_decay: float,
                 pad_to: int = 1) -> None:
        super().__init__(named_params, pad_to=pad_to)
        self.weight_decay = weight_decay
        device = self.named_params[0][1].device if self.named_params else torch.device("cpu")
        self.master = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        for (_, p), off in zip(self.named_params, self.offsets):
            self.master[off:off + p.numel()].copy_(p.detach().reshape(-1))
        self.grad = torch.zeros_like(self.master)

    def copy_master_to_params(self) -> None:
        """Copy the masters into parameters that do not alias them (e.g. after the cast to bf16/fp16)."""
        with torch.no_grad():
            for p, view in self.views(self.master):
                if p.data_ptr() != view.data_ptr():
                    p.copy_(view)

    def alias_params_to_master(self) -> None:
        """fp32 training: make the model's parameters views of the master buffer (no copy-back)."""
        for p, view in self.views(self.master):
            p.data = view
