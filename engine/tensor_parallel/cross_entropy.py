"""Cross-entropy over vocab-parallel logits without ever gathering the full vocabulary.

Each TP rank holds logits (N, V/tp) for its vocabulary slice. Loss per token:
    loss = log(sum_v exp(x_v - m)) + m - x_target,   m = max_v x_v
with the max, the sum of exponentials and the target logit each all-reduced over the TP group
(Megatron-LM's vocab_parallel_cross_entropy). Rows past the real vocabulary (padding added so the
vocabulary divides by tp) are masked to -inf: never predicted, never counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.distributed import collectives


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        # logits: (N, Vl) local slice, computed in fp32; target: (N,) global ids.
        x = logits.float()
        local_max = x.max(dim=-1).values
        collectives.all_reduce(local_max, group=group, op="max")
        x = x - local_max.unsqueeze(-1)
        exp = x.exp()
        sum_exp = exp.sum(dim=-1)
        local_t = target - vocab_start
        in_range = (local_t >= 0) & (local_t < x.shape[-1]) & (target != ignore_index)
        safe_t = local_t.clamp(0, x.shape[-1] - 1)
        target_logit = x.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1) * in_range
        packed = torch.stack((sum_exp, target_logit))  # one all-reduce for both
        collectives.all_reduce(packed, group=group)
        sum_exp, target_logit = packed[0], packed[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit) * valid
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, safe_t, in_range, valid)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_t, in_range, valid = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, safe_t] -= in_range.float()
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, group, vocab_start: int, vocab_size: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token losses (N,), zero where ``target == ignore_index``. ``logits``: (N, V_local)."""
    local_v = logits.shape[-1]
    pad_from = vocab_size - vocab_start  # local column where padding starts (may be >= local_v)
    if pad_from < local_v:
        mask = torch.arange(local_v, device=logits.device) >= pad_from
        logits = logits.masked_fill(mask, float("-inf"))
    if group is None or group.size == 1:
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return _VocabParallelCE.apply(logits, target, group, vocab_start, ignore_index)
