"""One ZeRO bucket: a flat layout of parameters sharded across the data-parallel group.

Every bucket is padded to a multiple of the DP size N and rank r owns elements [r*s, (r+1)*s) of it
(s = padded / N), so a bucket's gradients are reduce-scattered and its parameters all-gathered with one
equal-sized collective each (the FSDP flat-parameter layout; Rajbhandari et al. 2019, section 5). A
rank's shard of the model is the concatenation of its slices of every bucket.

A bucket may mix weight-decay classes (a stage-3 block is one bucket, so one all-gather): its parameters
are ordered decay first, and ``wd_segments`` lists the shard-local ranges of equal weight decay, which the
element-wise AdamW update visits one by one (the same arithmetic per element as one update per class).

Per rank a bucket holds: the fp32 master shard and Adam moments (s each), the fp32 gradient (the full
bucket for stage 1, the shard for stages 2-3), and the compute-dtype parameters (the full bucket as the
model's storage for stages 1-2 and persistent stage-3 buckets, the shard otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.optim.flat import FlatLayout


def _intersect(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class ShardedBucket(FlatLayout):
    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        *,
        weight_decay: dict[str, float],
        dp_size: int,
        dp_rank: int,
        full_grad: bool,
        partitioned: bool,
        unit: int = 0,
    ) -> None:
        super().__init__(named_params, pad_to=dp_size)
        self.partitioned = partitioned  # stage 3: the model holds only this rank's shard of the parameters
        self.unit = unit
        self.shard_numel = self.padded_numel // dp_size
        self.lo, self.hi = dp_rank * self.shard_numel, (dp_rank + 1) * self.shard_numel
        self.wd_segments = self._wd_segments(weight_decay)
        device = self.named_params[0][1].device
        self.master = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        for p, (a, b), (pa, pb) in self.shard_pieces():
            self.master[a:b].copy_(p.detach().reshape(-1)[pa:pb])
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        # Stage 1 accumulates the whole bucket and reduce-scatters it in place; stages 2-3 keep the shard.
        self.grad_full = torch.zeros(self.padded_numel, dtype=torch.float32, device=device) if full_grad else None
        self.grad = self.grad_full[self.lo : self.hi] if full_grad else torch.zeros_like(self.master)
        self.param_full: torch.Tensor | None = None  # compute-dtype storage of the gathered parameters
        self.param_shard: torch.Tensor | None = None  # stage 3: compute-dtype shard
        self.norm_segments: list[tuple[int, int]] = []  # shard-local ranges counted in the gradient norm
        self.tp_sum_segment: tuple[int, int] | None = None  # shard-local replicated range (sequence parallel)
        self.is_embedding = False

    def _wd_segments(self, weight_decay: dict[str, float]) -> list[tuple[int, int, float]]:
        """Shard-local (lo, hi, weight decay) ranges covering the shard; the padding joins the last range
        (its gradient and master are zero, so the update leaves it zero)."""
        runs: list[list] = []
        for (name, _), off, shape in zip(self.named_params, self.offsets, self.shapes):
            wd = weight_decay[name]
            if runs and runs[-1][2] == wd:
                runs[-1][1] = off + shape.numel()
            else:
                runs.append([off, off + shape.numel(), wd])
        if runs:
            runs[-1][1] = self.padded_numel
        out = []
        for lo, hi, wd in runs:
            hit = _intersect((lo, hi), (self.lo, self.hi))
            if hit is not None:
                out.append((hit[0] - self.lo, hit[1] - self.lo, wd))
        return out

    def shard_pieces(self):
        """(param, shard-local range, range inside the flattened param) for each param this shard touches."""
        for (_, p), off, shape in zip(self.named_params, self.offsets, self.shapes):
            hit = _intersect((off, off + shape.numel()), (self.lo, self.hi))
            if hit is not None:
                yield p, (hit[0] - self.lo, hit[1] - self.lo), (hit[0] - off, hit[1] - off)

    def to_shard_ranges(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Bucket ranges -> shard-local ranges (the parts inside this rank's shard)."""
        out = []
        for r in ranges:
            hit = _intersect(r, (self.lo, self.hi))
            if hit is not None:
                out.append((hit[0] - self.lo, hit[1] - self.lo))
        return out

    # ------------------------------------------------------------------ parameter storage

    def bind_full(self, full: torch.Tensor) -> None:
        """Make the model's parameters views of ``full`` (the gathered bucket in compute dtype)."""
        self.param_full = full
        for p, view in self.views(full):
            p.data = view

    def own_params(self) -> None:
        """Stages 1-2 / persistent: give the parameters one contiguous compute-dtype buffer that the
        all-gather writes into directly. Called lazily, after the trainer's cast to the compute dtype."""
        p0 = self.named_params[0][1]
        if self.param_full is not None and p0.data_ptr() == self.param_full.data_ptr():
            return
        full = torch.zeros(self.padded_numel, dtype=p0.dtype, device=p0.device)
        for p, view in self.views(full):
            view.copy_(p.detach())
        self.bind_full(full)

    def release(self) -> None:
        """Stage 3: drop the gathered parameters; the model keeps empty placeholders of the right dtype."""
        self.param_full = None
        for _, p in self.named_params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def compute_dtype(self) -> torch.dtype:
        return self.named_params[0][1].dtype

    def model_state_bytes(self) -> dict[str, int]:
        if self.partitioned:
            params = (
                self.param_shard.numel() * self.param_shard.element_size()
                if self.param_shard is not None
                else self.shard_numel * self.compute_dtype().itemsize
            )
        else:
            params = self.padded_numel * self.compute_dtype().itemsize
        grads = (self.grad_full if self.grad_full is not None else self.grad).numel() * 4
        return {"params": params, "grads": grads, "optimizer": 3 * 4 * self.shard_numel}


def build_buckets(
    named_params: list[tuple[str, nn.Parameter]],
    *,
    weight_decay: dict[str, float],
    dp_size: int,
    dp_rank: int,
    bucket_size: int,
    full_grad: bool,
    unit: int = 0,
    partitioned: bool = False,
    isolate: tuple[str, ...] = (),
) -> list[ShardedBucket]:
    """Buckets of at most ``bucket_size`` elements (at least one parameter each), filled in reverse model
    order (backward produces the last parameters' gradients first); inside a bucket the parameters with
    weight decay come first, so a bucket has at most a few ``wd_segments``. ``weight_decay`` maps every
    name to its decay. Names in ``isolate`` get a bucket alone: the tied embedding, whose shard must line
    up between the first and the last pipeline stage."""
    out: list[list] = []
    current: list = []
    for name, p in reversed(named_params):
        if name in isolate:
            out.append([(name, p)])
            continue
        if current and sum(q.numel() for _, q in current) + p.numel() > bucket_size:
            out.append(current)
            current = []
        current.append((name, p))
    if current:
        out.append(current)
    ordered = [sorted(members[::-1], key=lambda m: weight_decay[m[0]] == 0.0) for members in out]
    return [
        ShardedBucket(
            members,
            weight_decay=weight_decay,
            dp_size=dp_size,
            dp_rank=dp_rank,
            full_grad=full_grad,
            unit=unit,
            partitioned=partitioned,
        )
        for members in ordered
    ]
