"""Gradient communication for the optimizer: data-parallel reduction of the flat fp32 gradients
and model-parallel sums of the squared norm, with each logical parameter counted exactly once.

``LocalGradSync`` is the single-device case (no communication). ``GradSync`` is the protocol the
optimizer relies on; the distributed implementation lives beside it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class GradSync(Protocol):
    def norm_ranges(self, group) -> list[tuple[int, int]]: ...

    def reduce_gradients(self, groups, *, data_parallel: bool = True) -> None: ...

    def sum_across_model_parallel(self, value: torch.Tensor) -> torch.Tensor: ...


class LocalGradSync:
    """One device: every parameter counts in the norm, nothing to reduce."""

    def norm_ranges(self, group) -> list[tuple[int, int]]:
        return [(0, group.numel)] if group.numel else []

    dp_group = None

    def reduce_gradients(self, groups, *, data_parallel: bool = True) -> None:
        pass

    def sum_across_model_parallel(self, value: torch.Tensor) -> torch.Tensor:
        return value


class DistGradSync:
    """Gradients across processes, for the flat buffers of ``MixedPrecisionOptimizer``.

    - TP-replicated parameters (norm weights, row-parallel biases, learned positions) hold the same
      value on every TP rank. Without sequence parallelism their gradients are identical too; with it,
      each rank saw only its slice of the sequence, so their gradients are summed over the TP group.
    - Tied embeddings under pipeline parallelism: the first stage's embedding and the last stage's
      head copy are one logical parameter, so their gradients are summed over the embedding group
      (first and last stage) and the norm counts the copy on the first stage only.
    - Data parallelism sums the gradients over the DP group (the loss is already divided by the
      global token count, so the sum is the global mean).
    - The squared norm counts a replicated parameter on TP rank 0 only, then sums over tp x pp.
    """

    def __init__(self, groups, *, sequence_parallel: bool, tied_embeddings: bool = False) -> None:
        self.groups = groups
        self.sequence_parallel = sequence_parallel and groups.tp.size > 1
        emb = groups.embedding
        self.embedding_group = emb if (tied_embeddings and emb is not None and emb.size > 1) else None

    @staticmethod
    def _embedding_range(group) -> tuple[int, int] | None:
        for (name, _), off, shape in zip(group.named_params, group.offsets, group.shapes):
            if name == "embed.weight" or name.endswith(".embed.weight"):
                return off, off + shape.numel()
        return None

    def norm_ranges(self, group) -> list[tuple[int, int]]:
        end = group.numel if self.groups.tp.rank == 0 else group.replicated_start
        ranges = [(0, end)] if end else []
        emb = self._embedding_range(group) if self.embedding_group is not None else None
        if emb is not None and self.embedding_group.rank != 0:  # the last stage's copy: counted on the first
            ranges = [
                r
                for start, stop in ranges
                for r in ((start, min(stop, emb[0])), (max(start, emb[1]), stop))
                if r[0] < r[1]
            ]
        return ranges

    @property
    def dp_group(self):
        """The data-parallel group, or None when there is nothing to reduce over."""
        return self.groups.dp if self.groups.dp.size > 1 else None

    def reduce_gradients(self, groups, *, data_parallel: bool = True) -> None:
        """TP / tied-embedding sums, then the DP sum unless the caller already reduced over DP (the
        overlapped buckets of stage 0): the sums commute, so their order does not change the result."""
        from engine.distributed import collectives

        for g in groups:
            if self.sequence_parallel and g.replicated_start < g.numel:
                collectives.all_reduce(g.grad[g.replicated_start : g.numel], self.groups.tp)
            if self.embedding_group is not None:
                emb = self._embedding_range(g)
                if emb is not None:
                    collectives.all_reduce(g.grad[emb[0] : emb[1]], self.embedding_group)
            if data_parallel and self.groups.dp.size > 1:
                collectives.all_reduce(g.grad, self.groups.dp)

    def sum_across_model_parallel(self, value: torch.Tensor) -> torch.Tensor:
        from engine.distributed import collectives

        if self.groups.model_parallel.size > 1:
            collectives.all_reduce(value, self.groups.model_parallel)
        return value


class OverlappedDPReduce:
    """Stage 0: bucketed all-reduce of the flat fp32 gradients over DP, launched from the gradient hooks
    as soon as a bucket's last gradient of the step's last micro-batch has been accumulated, so the
    communication overlaps the rest of backward (PyTorch DDP, Li et al. 2020).

    Buckets are contiguous ranges of a group's flat buffer of at most ``bucket_size`` elements (at least
    one parameter), taken from the end of the buffer, which backward reaches first. A parameter's hook
    fires once per backward, so a bucket is complete after ``len(params) * micro_batches`` firings.
    Buckets that never complete (unused parameters) are reduced in ``finish``."""

    def __init__(self, groups, dp_group, *, bucket_size: int, micro_batches: int, overlap: bool) -> None:
        self.dp_group = dp_group
        self.overlap = overlap
        self.buckets: list[dict] = []
        self.bucket_of: dict[int, dict] = {}
        for g in groups:
            order = list(zip(g.named_params, g.offsets))[::-1]
            current: list = []
            for (_, p), off in order:
                if current and sum(q.numel() for q, _ in current) + p.numel() > bucket_size:
                    self._add(g, current, micro_batches)
                    current = []
                current.append((p, off))
            if current:
                self._add(g, current, micro_batches)
        self.handles: list = []

    def _add(self, group, members, micro_batches: int) -> None:
        start = min(off for _, off in members)
        end = max(off + p.numel() for p, off in members)
        bucket = {"grad": group.grad[start:end], "needed": len(members) * micro_batches, "seen": 0, "launched": False}
        self.buckets.append(bucket)
        for p, _ in members:
            self.bucket_of[id(p)] = bucket

    def on_grad(self, param) -> None:
        from engine.distributed import collectives

        bucket = self.bucket_of[id(param)]
        bucket["seen"] += 1
        if self.overlap and bucket["seen"] == bucket["needed"]:
            bucket["launched"] = True
            self.handles.append(collectives.all_reduce_async(bucket["grad"], self.dp_group))

    def finish(self) -> None:
        """Wait for the launched buckets, reduce the rest (in a fixed order on every rank), reset."""
        from engine.distributed import collectives

        for h in self.handles:
            h.wait()
        for bucket in self.buckets:
            if not bucket["launched"]:
                collectives.all_reduce(bucket["grad"], self.dp_group)
            bucket["seen"], bucket["launched"] = 0, False
        self.handles = []
