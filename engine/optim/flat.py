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

    def describe(self) -> dict:
        """Self-describing layout saved beside the flat optimizer states (checkpoint format 2), so a
        checkpoint is decoded into per-parameter tensors without the model (engine/checkpoint/reshard.py):
        names, shapes and offsets in the flat buffer, and each parameter's TP split (``tp_dim`` and the
        full block sizes ``tp_sizes``; None when replicated over TP)."""
        tp = [
            None if getattr(p, "tp_dim", None) is None else (int(p.tp_dim), tuple(int(s) for s in p.tp_sizes))
            for _, p in self.named_params
        ]
        return {
            "names": [n for n, _ in self.named_params],
            "shapes": [tuple(s) for s in self.shapes],
            "offsets": list(self.offsets),
            "tp": tp,
            "numel": self.numel,
            "padded_numel": self.padded_numel,
        }

    def fill_from(
        self, flat: torch.Tensor, tensors: dict[str, torch.Tensor], *, lo: int = 0, hi: int | None = None
    ) -> None:
        """Write ``tensors`` (name -> tensor shaped like the parameter) into ``flat``, which holds elements
        [lo, hi) of this layout (a ZeRO shard, or the whole buffer); padding is zeroed."""
        hi = self.padded_numel if hi is None else hi
        flat.zero_()
        for (name, _), off, shape in zip(self.named_params, self.offsets, self.shapes):
            a, b = max(off, lo), min(off + shape.numel(), hi)
            if a < b:
                flat[a - lo : b - lo].copy_(tensors[name].reshape(-1)[a - off : b - off])

    def views(self, flat: torch.Tensor):
        """(param, view of ``flat`` shaped like param) pairs."""
        for (_, p), off, shape in zip(self.named_params, self.offsets, self.shapes):
            yield p, flat[off : off + shape.numel()].view(shape)


class FlatGroup(FlatLayout):
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, weight_decay: float, pad_to: int = 1) -> None:
        super().__init__(named_params, pad_to=pad_to)
        self.weight_decay = weight_decay
        device = self.named_params[0][1].device if self.named_params else torch.device("cpu")
        self.master = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        for (_, p), off in zip(self.named_params, self.offsets):
            self.master[off : off + p.numel()].copy_(p.detach().reshape(-1))
        self.grad = torch.zeros_like(self.master)

    compute: torch.Tensor | None = None  # flat compute-dtype storage the parameters alias, when set

    def alias_params_to_compute(self) -> None:
        """Give the (already cast to bf16/fp16) parameters one flat storage of their dtype, so that the
        copy-back after a step is one copy (or is fused into the AdamW kernel) instead of one per tensor."""
        dtypes = {p.dtype for _, p in self.named_params}
        if len(dtypes) != 1 or dtypes == {torch.float32}:
            return
        self.compute = torch.zeros(self.padded_numel, dtype=dtypes.pop(), device=self.master.device)
        with torch.no_grad():
            for p, view in self.views(self.compute):
                view.copy_(p.data)
                p.data = view

    def compute_aliased(self) -> bool:
        """Whether every parameter still lives in ``compute`` (nothing replaced its storage since)."""
        return self.compute is not None and all(p.data_ptr() == view.data_ptr() for p, view in self.views(self.compute))

    def copy_master_to_params(self) -> None:
        """Copy the masters into parameters that do not alias them (e.g. after the cast to bf16/fp16)."""
        with torch.no_grad():
            if self.compute_aliased():
                self.compute.copy_(self.master)
                return
            for p, view in self.views(self.master):
                if p.data_ptr() != view.data_ptr():
                    p.copy_(view)

    def alias_params_to_master(self) -> None:
        """fp32 training: make the model's parameters views of the master buffer (no copy-back)."""
        for p, view in self.views(self.master):
            p.data = view
