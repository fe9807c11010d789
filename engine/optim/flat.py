"""Contiguous fp32 buffers for one optimizer group: master weights, accumulated gradients, Adam moments.

Parameters are packed in a fixed order, TP-sharded ones first and TP-replicated ones (norm weights,
row-parallel biases) last, so the gradient norm counts the replicated tail once per TP group by
slicing instead of masking. ZeRO shards these same buffers across data-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatGroup:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, weight_decay: float,
                 pad_to: int = 1) -> None:
        sharded = [(n, p) for n, p in named_params if not getattr(p, "tp_replicated", False)]
        replicated = [(n, p) for n, p in named_params if getattr(p, "tp_replicated", False)]
        self.named_params = sharded + replicated
        self.weight_decay = weight_decay
        self.offsets: list[int] = []
        offset = 0
        for _, p in self.named_params:
            self.offsets.append(offset)
            offset += p.numel()
        self.replicated_start = sum(p.numel() for _, p in sharded)
        self.numel = offset
        self.padded_numel = -(-offset // pad_to) * pad_to if offset else 0
        device = self.named_params[0][1].device if self.named_params else torch.device("cpu")
        self.master = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        for (_, p), off in zip(self.named_params, self.offsets):
            self.master[off:off + p.numel()].copy_(p.detach().reshape(-1))
        self.grad = torch.zeros_like(self.master)

    def views(self, flat: torch.Tensor):
        """(param, view of ``flat`` shaped like param) pairs."""
        for (_, p), off in zip(self.named_params, self.offsets):
            yield p, flat[off:off + p.numel()].view_as(p)

    def copy_master_to_params(self) -> None:
        with torch.no_grad():
            for p, view in self.views(self.master):
                if p.data_ptr() != view.data_ptr():
                    p.copy_(view)

    def alias_params_to_master(self) -> None:
        """fp32 training: make the model's parameters views of the master buffer (no copy-back)."""
        for p, view in self.views(self.master):
            p.data = view
