"""Gradient reduction for ZeRO buckets, driven by the parameters' post-accumulate-grad hooks.

Stage 1: gradients accumulate over the step's micro-batches into the full fp32 bucket; after the last
micro-batch's last gradient of a bucket, the bucket is reduce-scattered in place (rank r's shard ends up in
its own slice of the buffer). Stages 2-3: each micro-batch's gradients are copied into a transient
contiguous fp32 buffer per piece (``contiguous_gradients``) that is reduce-scattered as soon as the piece
is complete and then added to the persistent fp32 shard and freed, so no rank ever holds the full gradients
beyond the pieces in flight. ``overlap_comm`` launches the collectives asynchronously from the hooks, and
for stages 2-3 splits a bucket into one piece per unit (the outer parameters, each transformer block;
engine/zero/pieces.py), so that even one model-sized bucket (DeepSpeed's default ``reduce_bucket_size``) is
reduced while backward goes on and its transient buffers stay a few blocks large. Otherwise a bucket is one
piece, reduced with one collective. (Stage 1 keeps whole buckets: its gradients are persistent anyway, and
on 2 CPU cores reducing it in pieces measured no faster: the collectives compete with backward for the
cores.)
"""

from __future__ import annotations

import torch

from engine.distributed import collectives
from engine.zero.buckets import ShardedBucket
from engine.zero.pieces import ReducePiece, plan_pieces

MAX_IN_FLIGHT = 2  # pieces reduced concurrently before the oldest is waited on


class BucketReducer:
    def __init__(
        self,
        buckets: list[ShardedBucket],
        dp_group,
        *,
        stage: int,
        micro_batches: int,
        overlap: bool,
        on_bucket_done=None,
        unit_of: dict[int, int] | None = None,
        piece_numel: int | None = None,
    ) -> None:
        self.buckets = buckets
        self.dp_group = dp_group
        self.stage = stage
        self.overlap = overlap
        self.on_bucket_done = on_bucket_done  # stage 3: release a unit whose gradients are all reduced
        unit_of = unit_of if overlap and stage >= 2 and unit_of is not None else {}
        self.pieces: dict[int, list[ReducePiece]] = {}
        for b in buckets:
            self.pieces[id(b)] = plan_pieces(
                b.offsets,
                [s.numel() for s in b.shapes],
                [unit_of.get(id(p), 0) for _, p in b.named_params],
                padded_numel=b.padded_numel,
                dp_size=dp_group.size,
                dp_rank=dp_group.rank,
                max_numel=piece_numel,
            )
        every = micro_batches if stage == 1 else 1
        self.needed = {id(pc): len(pc.members) * every for b in buckets for pc in self.pieces[id(b)]}
        self.seen = dict.fromkeys(self.needed, 0)
        self.left = {id(b): len(self.pieces[id(b)]) for b in buckets}  # pieces not yet launched this round
        self.launched: set[int] = set()
        self.staging: dict[int, torch.Tensor] = {}
        self.free: list[torch.Tensor] = []  # released staging buffers, reused by _take
        self.staged_numel = self.peak_staged_numel = 0  # stages 2-3: transient gradient elements held
        self.in_flight: list[tuple[ShardedBucket, ReducePiece, torch.Tensor, collectives.Handle]] = []
        self.hooks = []
        for b in buckets:
            for piece in self.pieces[id(b)]:
                for member, pos in zip(piece.members, piece.positions):
                    p = b.named_params[member][1]
                    self.hooks.append(
                        p.register_post_accumulate_grad_hook(self._make_hook(b, piece, b.offsets[member], pos))
                    )

    def _make_hook(self, bucket: ShardedBucket, piece: ReducePiece, offset: int, pos: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.reshape(-1)
            if bucket.grad_full is not None:
                bucket.grad_full[offset : offset + g.numel()].add_(g)
            else:
                base = self.staging.get(id(piece))
                if base is None:
                    base = self.staging[id(piece)] = self._take(piece.numel, bucket.master.device)
                    self.staged_numel += piece.numel
                    self.peak_staged_numel = max(self.peak_staged_numel, self.staged_numel)
                base[pos : pos + g.numel()].add_(g)
            p.grad = None
            self.seen[id(piece)] += 1
            if self.seen[id(piece)] == self.needed[id(piece)]:
                self._launch(bucket, piece)

        return hook

    def _take(self, numel: int, device: torch.device) -> torch.Tensor:
        """A zeroed fp32 staging buffer of at least ``numel`` elements: a released one when one is large
        enough (no fresh allocation and page faults each micro-batch on CPU), else a new one."""
        fits = [i for i, t in enumerate(self.free) if t.numel() >= numel and t.device == device]
        if not fits:
            return torch.zeros(numel, dtype=torch.float32, device=device)
        base = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        base[:numel].zero_()
        return base

    def _launch(self, bucket: ShardedBucket, piece: ReducePiece) -> None:
        """Reduce-scatter one complete piece; stages 2-3 add this rank's part to the gradient shard."""
        self.seen[id(piece)] = 0
        base = None
        if bucket.grad_full is not None:  # stage 1: always the whole bucket
            self.launched.add(id(piece))
            send = bucket.grad_full
        else:
            base = self.staging.pop(id(piece))
            send = base[: piece.numel]
        if piece.whole:  # rank r's part is its own slice: reduce in place
            out = send[bucket.lo : bucket.hi]
            handle = collectives.reduce_scatter_tensor_async(out, send, self.dp_group)
        else:
            out = torch.empty(piece.splits[self.dp_group.rank], dtype=send.dtype, device=send.device)
            handle = collectives.reduce_scatter_uneven_async(out, send, piece.splits, self.dp_group)
        self.in_flight.append((bucket, piece, out, handle, base))
        if not self.overlap or len(self.in_flight) > MAX_IN_FLIGHT:
            self._drain(keep=0 if not self.overlap else MAX_IN_FLIGHT)
        self.left[id(bucket)] -= 1
        if self.left[id(bucket)] == 0:
            self.left[id(bucket)] = len(self.pieces[id(bucket)])
            if self.on_bucket_done is not None:
                self.on_bucket_done(bucket)

    def _drain(self, *, keep: int = 0) -> None:
        while len(self.in_flight) > keep:
            bucket, piece, out, handle, base = self.in_flight.pop(0)
            handle.wait()
            if bucket.grad_full is not None:
                continue  # stage 1: reduced in place
            self.staged_numel -= piece.numel  # stages 2-3: the staging buffer is released with this entry
            if piece.whole:
                bucket.grad.add_(out)
            else:
                for lo, hi, at in piece.mine:
                    bucket.grad[lo:hi].add_(out[at : at + hi - lo])
            if len(self.free) <= MAX_IN_FLIGHT:  # keep at most as many as can be in use at once
                self.free.append(base)

    def finish(self) -> None:
        """Wait for every piece and reduce those the hooks did not complete (unused parameters), in
        bucket order on every rank; afterwards each bucket's ``grad`` holds this rank's reduced shard."""
        for b in self.buckets:
            for piece in self.pieces[id(b)]:
                if (id(piece) not in self.launched) if b.grad_full is not None else (id(piece) in self.staging):
                    self._launch(b, piece)
        self._drain()
        self.launched.clear()
        self.seen = dict.fromkeys(self.seen, 0)
        self.left = {id(b): len(self.pieces[id(b)]) for b in self.buckets}
