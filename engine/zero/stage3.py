"""ZeRO stage 3 parameter lifecycle: each rank keeps only its shard of a layer's parameters; the layer
is all-gathered just before its forward and again before its backward, and released after use.

Units: unit 0 is everything outside the blocks (embedding, positions, final norm, head); units 1..L are
the transformer blocks, chunk by chunk in forward order when a pipeline stage holds several chunks. A
block is gathered by its forward pre-hook and released by its forward hook; in training a hook on the
block's output gradient gathers it again when backward reaches it, and the block is released once its
buckets' gradients are reduced. While gathering a block, the next blocks of the same chunk (in forward
order, or in reverse during backward) are prefetched asynchronously up to ``stage3_prefetch_bucket_size``
elements; the last block of a chunk is re-gathered as soon as its forward ends, overlapping the head.
Each unit is one partitioned bucket (both weight-decay classes), so one all-gather per block and pass.
Buckets of parameters below ``stage3_param_persistence_threshold`` are never partitioned
(DeepSpeed's persistent parameters): they behave as in stage 2.

DeepSpeed's two other stage-3 knobs (engine/zero/live_params.py): a block used again within
``stage3_max_reuse_distance`` gathered elements (the last blocks: their backward follows their forward
closely) is not released after its forward, which saves its backward all-gather; and prefetching stops where
the next gather would put more than ``stage3_max_live_parameters`` gathered elements alive (``live_numel``,
counting gathers in flight; its high-water mark is ``peak_live_numel``). A unit that is about to be
computed is gathered whatever the cap.

Unit 0 is gathered by the whole model's forward pre-hook, and by pre-hooks on each chunk's ``embed`` and
``final_norm`` modules: the pipeline executor never calls ``forward()`` but ``embed_tokens`` /
``run_layers`` / ``loss_sum``, which run those modules before touching any other unit-0 parameter (the
tied head is read in ``logits`` right after ``final_norm``). Without a pipeline unit 0 is released once its
gradients of the micro-batch are reduced. With one (``hold_outer``) it stays gathered until the optimizer
step: the executor interleaves micro-batches, so a later micro-batch's backward through the head may come
after an earlier one's reduction, and the head's backward needs the weight (no output-gradient hook fires
before it). The optimizer releases every unit at its step, before the new shards are written, so no gathered
copy is ever stale.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed import collectives
from engine.zero.buckets import ShardedBucket
from engine.zero.live_params import kept_blocks

UNBOUNDED = 1 << 62


class ParamGatherer:
    def __init__(
        self,
        model: nn.Module,
        units: list[list[ShardedBucket]],
        dp_group,
        *,
        prefetch_numel: int,
        max_live_numel: int = UNBOUNDED,
        max_reuse_distance: int = 0,
        hold_outer: bool = False,
    ) -> None:
        self.units = [[b for b in unit if b.partitioned] for unit in units]
        self.dp_group = dp_group
        self.prefetch_numel = prefetch_numel
        self.max_live_numel = max_live_numel
        self.hold_outer = hold_outer
        self.live_numel = 0  # gathered elements alive (bound to the model or in flight)
        self.peak_live_numel = 0
        self.in_flight: dict[int, tuple[torch.Tensor, collectives.Handle]] = {}
        self.reduced = [0] * len(units)
        self.unit_of = {id(b): i for i, unit in enumerate(self.units) for b in unit}
        for unit in self.units:
            for b in unit:
                b.param_shard = b.master.clone()  # fp32 until the first gather sees the compute dtype
                b.release()
        chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
        blocks = [(c, block) for c, chunk in enumerate(chunks) for block in getattr(chunk, "layers", [])]
        self.chunk_of = [-1] + [c for c, _ in blocks]  # prefetch never crosses into another chunk
        numel = [sum(b.padded_numel for b in unit) for unit in self.units]
        computes_head = any(getattr(chunk, "final_norm", None) is not None for chunk in chunks)
        self.kept = kept_blocks(
            numel, computes_head=computes_head, max_reuse_distance=max_reuse_distance, max_live=max_live_numel
        )
        model.register_forward_pre_hook(lambda m, args: self._gather(0, direction=1))
        model.register_forward_hook(lambda m, args, out: None if torch.is_grad_enabled() else self.release(0))
        for chunk in chunks:
            if getattr(chunk, "embed", None) is not None and getattr(chunk, "first", True):
                chunk.embed.register_forward_pre_hook(lambda m, args: self._gather(0, direction=1))
            if getattr(chunk, "final_norm", None) is not None:
                chunk.final_norm.register_forward_pre_hook(lambda m, args: self._gather(0, direction=0))
        for i, (_, block) in enumerate(blocks, start=1):
            block.register_forward_pre_hook(self._make_pre_hook(i))
            block.register_forward_hook(self._make_post_hook(i))
        model.register_state_dict_pre_hook(lambda m, prefix, keep_vars: self.gather_all())
        model._register_state_dict_hook(lambda m, sd, prefix, meta: self.release_all())
        model._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.gather_all())
        model.register_load_state_dict_post_hook(lambda m, keys: self.reshard_from_params())

    def _make_pre_hook(self, unit: int):
        return lambda m, args: self._gather(unit, direction=1)

    def _make_post_hook(self, unit: int):
        # The last block of a chunk is the first one backward needs, right after the head's forward and
        # backward: re-gather it now, asynchronously, so that collective overlaps the head instead of
        # stalling backward's first step (same bytes as gathering it in the output-gradient hook).
        last = unit + 1 == len(self.units) or self.chunk_of[unit + 1] != self.chunk_of[unit]
        kept = unit in self.kept
        early = last and not kept and not self.hold_outer and self.prefetch_numel > 0

        def hook(m, args, out):
            training = torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad
            if not (training and kept):  # a kept block stays gathered until its gradients are reduced
                self.release(unit)
            if training:
                out.register_hook(lambda grad: self._gather(unit, direction=-1))
                if early:
                    for b in self.units[unit]:
                        if not self._fits(b):
                            break
                        self._start(b)

        return hook

    # ------------------------------------------------------------------ gathering

    def _fits(self, bucket: ShardedBucket) -> bool:
        """Whether prefetching ``bucket`` keeps the gathered elements within ``stage3_max_live_parameters``."""
        live = id(bucket) in self.in_flight or bucket.param_full is not None
        return live or self.live_numel + bucket.padded_numel <= self.max_live_numel

    def _start(self, bucket: ShardedBucket) -> None:
        if id(bucket) in self.in_flight or bucket.param_full is not None:
            return
        self.live_numel += bucket.padded_numel
        self.peak_live_numel = max(self.peak_live_numel, self.live_numel)
        dtype = bucket.compute_dtype()
        if bucket.param_shard.dtype != dtype:  # the trainer cast the model after building the optimizer
            bucket.param_shard = bucket.master.to(dtype)
        full = torch.empty(bucket.padded_numel, dtype=dtype, device=bucket.master.device)
        self.in_flight[id(bucket)] = (
            full,
            collectives.all_gather_into_tensor_async(full, bucket.param_shard, self.dp_group),
        )

    def _gather(self, unit: int, *, direction: int) -> None:
        for b in self.units[unit]:
            self._start(b)
        budget, nxt = self.prefetch_numel if direction else 0, unit + direction
        # unit 0 is gathered by its own hooks; from unit 0 the prefetch runs into the first chunk's blocks
        while 0 < nxt < len(self.units) and budget > 0 and (unit == 0 or self.chunk_of[nxt] == self.chunk_of[unit]):
            for b in self.units[nxt]:
                if budget <= 0 or not self._fits(b):
                    budget = 0
                    break
                self._start(b)
                budget -= b.padded_numel
            nxt += direction
        for b in self.units[unit]:
            if id(b) in self.in_flight:
                full, handle = self.in_flight.pop(id(b))
                handle.wait()
                b.bind_full(full)

    def release(self, unit: int) -> None:
        for b in self.units[unit]:
            if b.param_full is not None:
                self.live_numel -= b.padded_numel
            b.release()

    def on_bucket_reduced(self, bucket: ShardedBucket) -> None:
        """All of ``bucket``'s gradients of this backward are reduced: release its unit when complete."""
        unit = self.unit_of.get(id(bucket))
        if unit is None or (unit == 0 and self.hold_outer):
            return
        self.reduced[unit] += 1
        if self.reduced[unit] == len(self.units[unit]):
            self.reduced[unit] = 0
            self.release(unit)

    def gather_all(self) -> None:
        for i in range(len(self.units)):
            self._gather(i, direction=0)

    def release_all(self) -> None:
        for i in range(len(self.units)):
            self.release(i)

    def reshard_from_params(self) -> None:
        """After ``model.load_state_dict``: keep this rank's shard of the loaded values."""
        for unit in self.units:
            for b in unit:
                b.param_shard = b.param_full[b.lo : b.hi].clone()
        self.release_all()

    def wait_all(self) -> None:
        """Settle prefetches nobody consumed (e.g. the last block's prefetch at the end of backward)."""
        for full, handle in self.in_flight.values():
            handle.wait()
            self.live_numel -= full.numel()
        self.in_flight.clear()

    def update_shards(self) -> None:
        """After the optimizer step: the new compute-dtype parameter shards from the fp32 masters."""
        for unit in self.units:
            for b in unit:
                if b.param_shard.dtype == torch.float32 and b.compute_dtype() != torch.float32:
                    b.param_shard = b.master.to(b.compute_dtype())
                else:
                    b.param_shard.copy_(b.master)
