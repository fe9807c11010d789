"""Gradient reduction for ZeRO buckets, driven by the parameters' post-accumulate-grad hooks.

Stage 1: gradients accumulate over the step's micro-batches into the full fp32 bucket; after the last
micro-batch's last gradient of a bucket, the bucket is reduce-scattered in place (rank r's shard ends up
in its own slice of the buffer). Stages 2-3: each micro-batch's gradients are copied into a transient
contiguous fp32 bucket (``contiguous_gradients``) that is reduce-scattered as soon as the bucket is
complete and then added to the persistent fp32 shard and freed, so no rank ever holds the full gradients
beyond the buckets in flight. ``overlap_comm`` launches the collectives asynchronously from the hooks.
"""

from __future__ import annotations

import torch

from engine.dist import collectives
from engine.zero.buckets import ShardedBucket

MAX_IN_FLIGHT = 2  # stage 2-3 buckets reduced concurrently before the oldest is waited on


class BucketReducer:
    def __init__(self, buckets: list[ShardedBucket], dp_group, *, stage: int, micro_batches: int, overlap: bool,
                 on_bucket_done=None) -> None:
        self.buckets = buckets
        self.dp_group = dp_group
        self.stage = stage
        self.overlap = overlap
        self.on_bucket_done = on_bucket_done  # stage 3: release a unit whose gradients are all reduced
        self.needed = {id(b): len(b.named_params) * (micro_batches if stage == 1 else 1) for b in buckets}
        self.seen = {id(b): 0 for b in buckets}
        self.launched: set[int] = set()
        self.staging: dict[int, torch.Tensor] = {}
        self.in_flight: list[tuple[ShardedBucket, torch.Tensor | None, collectives.Handle]] = []
        self.hooks = []
        for b in buckets:
            for (_, p), off in zip(b.named_params, b.offsets):
                self.hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b, off)))

    def _make_hook(self, bucket: ShardedBucket, offset: int):
        def hook(p: torch.Tensor) -> None:
            n = p.grad.numel()
            if bucket.grad_full is not None:
                bucket.grad_full[offset:offset + n].add_(p.grad.reshape(-1))
            else:
                buf = self.staging.get(id(bucket))
                if buf is None:
                    buf = self.staging[id(bucket)] = torch.zeros(bucket.padded_numel, dtype=torch.float32,
                                                                 device=bucket.master.device)
                buf[offset:offset + n].add_(p.grad.reshape(-1))
            p.grad = None
            self.seen[id(bucket)] += 1
            if self.seen[id(bucket)] == self.needed[id(bucket)]:
                self._launch(bucket)

        return hook

    def _launch(self, bucket: ShardedBucket) -> None:
        """Reduce-scatter one complete bucket in place; stages 2-3 then add the shard to the gradient."""
        self.seen[id(bucket)] = 0
        if bucket.grad_full is not None:
            self.launched.add(id(bucket))
            full, staging = bucket.grad_full, None
        else:
            full = staging = self.staging.pop(id(bucket))
        handle = collectives.reduce_scatter_tensor_async(full[bucket.lo:bucket.hi], full, self.dp_group)
        self.in_flight.append((bucket, staging, handle))
        if not self.overlap or len(self.in_flight) > MAX_IN_FLIGHT:
            self._drain(keep=0 if not self.overlap else MAX_IN_FLIGHT)
        if self.on_bucket_done is not None:
            self.on_bucket_done(bucket)

    def _drain(self, *, keep: int = 0) -> None:
        while len(self.in_flight) > keep:
            bucket, staging, handle = self.in_flight.pop(0)
            handle.wait()
            if staging is not None:
                bucket.grad.add_(staging[bucket.lo:bucket.hi])

    def finish(self) -> None:
        """Wait for every bucket and reduce those the hooks did not complete (unused parameters), in
        bucket order on every rank; afterwards each bucket's ``grad`` holds this rank's reduced shard."""
        for b in self.buckets:
            if b.grad_full is not None and id(b) not in self.launched:
                self._launch(b)
            elif b.grad_full is None and id(b) in self.staging:
                self._launch(b)
        self._drain()
        self.launched.clear()
        for b in self.buckets:
            self.seen[id(b)] = 0
