"""Fused AdamW step over flat fp32 shards with gradient unscaling and inf/nan detection.

Two passes by default, so that a non-finite gradient leaves every tensor untouched:

1. ``_nonfinite_kernel`` reads the gradient, unscales it and raises a device-side flag (fp32, 0 or 1)
   if any element is inf or nan. Writers only ever store 1.0, so their race is benign.
2. ``_adamw_kernel`` reads the flag first and returns at once when it is set; otherwise it does the
   whole update in one read of (param, grad, exp_avg, exp_avg_sq) and one write of each state, plus an
   optional low-precision copy of the new weights (the compute copy).

A caller that already knows whether the gradients are finite (the engine does: it takes the global
gradient norm over all shards before stepping, and a non-finite norm means an overflow) passes
``check_finite=False`` and gets one pass: 7 fp32 words moved per element instead of 8.

The flag stays on the device (no host sync); the caller may pass in a flag already raised elsewhere,
e.g. the all-reduced result over ZeRO shards, and may all-reduce the returned one (MAX).

The math is torch.optim.AdamW's single-tensor path: decoupled decay ``p *= 1 - lr*wd``, ``m.lerp_(g,
1-beta1)``, ``v = beta2*v + (1-beta2)*g*g``, ``p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``.
No autotuner: the update is in place, so benchmark re-launches would apply it more than once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels import reference
from engine.kernels.dispatch import interpreting, launchable, use_triton


@triton.jit
def _nonfinite_kernel(
    G,  # (n,) gradient, fp32/bf16/fp16
    FLAG,  # (1,) fp32 flag, set to 1.0 when any unscaled gradient element is inf or nan
    n,
    inv_scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(G + offs, mask=offs < n, other=0.0).to(tl.float32) * inv_scale
    bad = (g != g) | (tl.abs(g) == float("inf"))
    any_bad = tl.max(bad.to(tl.int32), axis=0) > 0
    tl.store(FLAG, 1.0, mask=any_bad)


@triton.jit
def _adamw_kernel(
    P,  # (n,) fp32 master weights, updated in place
    G,  # (n,) gradient, fp32/bf16/fp16, multiplied by inv_scale before use
    M,  # (n,) fp32 first moment, updated in place
    V,  # (n,) fp32 second moment, updated in place
    OUT,  # (n,) bf16/fp16 copy of the updated weights; not written unless HAS_OUT
    FLAG,  # (1,) fp32 found-inf flag from the check pass: nonzero means skip the step entirely
    n,
    inv_scale,
    one_minus_beta1,  # 1 - beta1, rounded once on the host as torch does
    beta2,
    one_minus_beta2,
    eps,
    decay,  # 1 - lr * weight_decay
    step_size,  # lr / (1 - beta1**step)
    bc2_sqrt,  # sqrt(1 - beta2**step); divided by, as torch does, to round identically
    HAS_OUT: tl.constexpr,
    HAS_FLAG: tl.constexpr,  # False: no flag to read (the caller checked the gradients itself)
    BLOCK: tl.constexpr,
):
    skip = 0.0
    if HAS_FLAG:
        skip = tl.load(FLAG)
    if skip == 0.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(P + offs, mask=mask, other=0.0)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)
        p = p * decay
        # same operation order as torch's CPU lerp_/addcmul_/addcdiv_, so fp32 results agree to rounding
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p + (-step_size) * m / denom
        tl.store(P + offs, p, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)
        if HAS_OUT:
            tl.store(OUT + offs, p.to(OUT.dtype.element_ty), mask=mask)


def _check(param, grad, exp_avg, exp_avg_sq, out, found_inf) -> None:
    n = param.numel()
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"adamw_: {name} must be a flat contiguous fp32 tensor, got {t.dtype} {tuple(t.shape)}")
        if t.numel() != n:
            raise ValueError(f"adamw_: {name} has {t.numel()} elements but param has {n}")
    if grad.numel() != n or grad.dim() != 1 or not grad.is_contiguous():
        raise ValueError(f"adamw_: grad must be flat, contiguous and have {n} elements, got {tuple(grad.shape)}")
    if out is not None and (out.numel() != n or out.dim() != 1 or not out.is_contiguous()):
        raise ValueError(f"adamw_: out must be flat, contiguous and have {n} elements, got {tuple(out.shape)}")
    if found_inf is not None and (found_inf.dtype != torch.float32 or found_inf.numel() != 1):
        raise ValueError("adamw_: found_inf must be a one-element fp32 tensor (0.0 or 1.0)")


@torch.no_grad()
def adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """One AdamW step in place on flat fp32 ``param``/``exp_avg``/``exp_avg_sq``.

    ``grad`` (fp32/bf16/fp16) is divided by ``grad_scale`` first. ``step`` counts from 1. Returns the
    found-inf flag, a one-element fp32 tensor on param's device (``bool(flag)`` syncs): when it is 1
    nothing was changed. A ``found_inf`` passed in is OR-ed with this shard's check and returned.
    ``check_finite=False`` skips the check pass (one pass over memory): the gradients are then taken as
    finite, and only a raised ``found_inf`` skips the step.
    """
    _check(param, grad, exp_avg, exp_avg_sq, out, found_inf)
    if step < 1:
        raise ValueError(f"adamw_: step counts from 1, got {step}")
    if not use_triton(param, grad, exp_avg, exp_avg_sq):
        return reference.adamw_(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            grad_scale=grad_scale,
            out=out,
            found_inf=found_inf,
            check_finite=check_finite,
        )
    flag = torch.zeros(1, dtype=torch.float32, device=param.device) if found_inf is None else found_inf
    n = param.numel()
    block = 128 if interpreting() else 2048
    grid = (triton.cdiv(n, block),)
    inv_scale = 1.0 / grad_scale
    if check_finite:
        check, _ = launchable(_nonfinite_kernel)
        check[grid](grad, flag, n, inv_scale, BLOCK=block, num_warps=4)
    update, _ = launchable(_adamw_kernel)
    update[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        out if out is not None else param,
        flag,
        n,
        inv_scale,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        1.0 - lr * weight_decay,
        lr / (1.0 - beta1**step),
        math.sqrt(1.0 - beta2**step),
        HAS_OUT=out is not None,
        HAS_FLAG=check_finite or found_inf is not None,
        BLOCK=block,
        num_warps=8,
    )
    return flag
