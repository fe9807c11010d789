"""Cross-entropy over a vocabulary, chunked so fp32 logits are never materialized whole.

Two kernels serve both the full-vocabulary loss and the vocab-parallel (tensor-parallel) form:

* ``_stats_kernel``: per row of a (N, V_shard) logits shard, one pass over BLOCK_V chunks with an online
  max / sum-exp (fp32 in registers), plus the target's logit when the target falls in the shard.
* ``_grad_kernel``: per row, ``(exp(x - lse) - onehot) * dloss`` written in the logits' dtype, optionally
  into the logits' own storage (the logits are dead once the loss is taken), so the whole op needs no
  memory beyond O(N) fp32 statistics.

Vocab-parallel protocol (the caller owns the process group; nothing here communicates):

1. ``local_max, local_sumexp, target_logit = vocab_parallel_stats(shard, target, vocab_start=...)``;
   ``local_sumexp`` is relative to ``local_max``, and ``target_logit`` is 0 where the target is elsewhere.
2. Combine over the TP group, either by two all-reduces -- ``gmax = max(local_max)``, then
   ``sum(local_sumexp * exp(local_max - gmax))`` and ``sum(target_logit)`` -- or by one all-gather of the
   three (tp, N) tensors and :func:`combine_vocab_parallel_stats`. ``lse = gmax + log(sumexp)`` and the
   per-row loss is ``lse - target_logit`` (0 on ignored rows).
3. Backward: ``vocab_parallel_grad(shard, target, lse, dloss_rows, vocab_start=...)`` per shard.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import reference
from engine.kernels.dispatch import interpreting, launchable, use_triton

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _stats_kernel(
    X,  # (N, V) logits shard, row stride stride_x, unit column stride
    TARGET,  # (N,) int64 global target ids
    MAX,  # (N,) fp32 out: row max over the shard
    SUMEXP,  # (N,) fp32 out: sum over the shard of exp(x - row max)
    TLOGIT,  # (N,) fp32 out: logit of the target if it lies in [vocab_start, vocab_start + V), else 0
    stride_x,
    V,
    vocab_start,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    # running (max, sum) per lane; lanes merge at the end, so one pass over the row suffices
    run_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(X + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # lanes still at -inf (padding) must add 0, not exp(nan)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - row_max))
    tl.store(MAX + row, row_max)
    tl.store(SUMEXP + row, tl.sum(run_sum * lane_scale, axis=0))
    target = tl.load(TARGET + row)
    local = target - vocab_start
    inside = (local >= 0) & (local < V) & (target != ignore_index)
    t_logit = tl.load(X + local, mask=inside, other=0.0).to(tl.float32)
    tl.store(TLOGIT + row, tl.where(inside, t_logit, 0.0))


@triton.jit
def _grad_kernel(
    X,  # (N, V) logits shard, row stride stride_x
    DX,  # (N, V) out: gradient in DX's dtype, row stride stride_dx; may alias X
    TARGET,  # (N,) int64 global target ids
    LSE,  # (N,) fp32 global log-sum-exp per row
    DLOSS,  # (N,) fp32 d(total loss)/d(row loss), element stride stride_dloss (0 broadcasts a scalar)
    stride_x,
    stride_dx,
    stride_dloss,
    V,
    vocab_start,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DX += row * stride_dx
    target = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    dloss = tl.load(DLOSS + row * stride_dloss).to(tl.float32)
    dloss = tl.where(target == ignore_index, 0.0, dloss)
    local = target - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
        tl.store(DX + cols, (grad * dloss).to(DX.dtype.element_ty), mask=mask)


def _block_v(v: int) -> tuple[int, int]:
    if interpreting():
        return min(triton.next_power_of_2(v), 64), 1  # small chunks: tiny tests walk the chunk loop
    return min(triton.next_power_of_2(v), 8192), 8


def _check_shard(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("logits must have a unit stride along the vocabulary (hint: call .contiguous())")


def _stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int):
    n, v = logits.shape
    out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3)]
    block, warps = _block_v(v)
    kernel, _ = launchable(_stats_kernel)
    kernel[(n,)](logits, target, *out, logits.stride(0), v, vocab_start, ignore_index, BLOCK_V=block, num_warps=warps)
    return tuple(out)


def _grad(logits, target, lse, dloss_rows, vocab_start: int, ignore_index: int, out: torch.Tensor):
    n, v = logits.shape
    block, warps = _block_v(v)
    kernel, _ = launchable(_grad_kernel)
    kernel[(n,)](
        logits,
        out,
        target,
        lse,
        dloss_rows,
        logits.stride(0),
        out.stride(0),
        dloss_rows.stride(0),
        v,
        vocab_start,
        ignore_index,
        BLOCK_V=block,
        num_warps=warps,
    )
    return out


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index: int, reduction: str, inplace_backward: bool):
        row_max, sumexp, t_logit = _stats(logits, target, 0, ignore_index)
        lse = row_max + torch.log(sumexp)  # (N,) fp32
        valid = target != ignore_index
        rows = torch.where(valid, lse - t_logit, torch.zeros_like(lse))
        n_valid = valid.sum().to(torch.float32)
        ctx.save_for_backward(logits, target, lse, n_valid)
        ctx.ignore_index, ctx.reduction, ctx.inplace = ignore_index, reduction, inplace_backward
        if reduction == "none":
            return rows
        return rows.sum() / n_valid if reduction == "mean" else rows.sum()

    @staticmethod
    def backward(ctx, dloss):
        logits, target, lse, n_valid = ctx.saved_tensors
        n = logits.shape[0]
        dloss = dloss.float()
        if ctx.reduction == "mean":
            dloss = dloss / n_valid
        dloss_rows = dloss.reshape(1).expand(n) if ctx.reduction != "none" else dloss.contiguous()
        out = logits if ctx.inplace else torch.empty_like(logits)
        _grad(logits, target, lse, dloss_rows, 0, ctx.ignore_index, out)
        return out, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against integer targets (...); fp32 loss.

    ``reduction="mean"`` averages over targets that are not ``ignore_index`` (nan if there are none, like
    torch). With ``inplace_backward=True`` the gradient overwrites the logits tensor in the backward,
    so the logits must not be used after ``loss.backward()``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} minus vocab")
    if not use_triton(logits, target):
        return reference.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    loss = _CrossEntropyFunction.apply(flat, target.reshape(-1), ignore_index, reduction, inplace_backward)
    return loss.view(target.shape) if reduction == "none" else loss


def vocab_parallel_stats(
    logits_shard: torch.Tensor, target: torch.Tensor, *, vocab_start: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local statistics of a (N, V/tp) logits shard covering ids [vocab_start, vocab_start + V/tp).

    Returns fp32 (N,) tensors: the row max over the shard, the sum of exp(x - that max) over the shard,
    and the target's logit where the target falls in this shard (else 0; also 0 on ignored rows).
    """
    _check_shard(logits_shard, target)
    if not use_triton(logits_shard, target):
        return reference.vocab_parallel_stats(logits_shard, target, vocab_start=vocab_start, ignore_index=ignore_index)
    return _stats(logits_shard, target, vocab_start, ignore_index)


def combine_vocab_parallel_stats(
    local_max: torch.Tensor, local_sumexp: torch.Tensor, target_logit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, target_logit) per row from the stacked (tp, N) statistics of all shards (e.g. all-gathered)."""
    global_max = local_max.max(dim=0).values  # (N,)
    sumexp = (local_sumexp * torch.exp(local_max - global_max)).sum(dim=0)
    return global_max + torch.log(sumexp), target_logit.sum(dim=0)


def vocab_parallel_grad(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    *,
    vocab_start: int,
    ignore_index: int = -100,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. one shard: (softmax - onehot) * dloss per row, in the shard's dtype.

    ``lse`` is the global (N,) log-sum-exp, ``dloss`` the (N,) gradient of the total loss w.r.t. each row's
    loss (e.g. ``1 / n_valid`` for a mean). ``out`` may be the shard itself to write the gradient in place.
    """
    _check_shard(logits_shard, target)
    if not use_triton(logits_shard, target):
        grad = reference.vocab_parallel_grad(
            logits_shard, target, lse, dloss, vocab_start=vocab_start, ignore_index=ignore_index
        )
        return grad if out is None else out.copy_(grad)
    out = torch.empty_like(logits_shard) if out is None else out
    return _grad(logits_shard, target, lse.float().contiguous(), dloss.float(), vocab_start, ignore_index, out)
