"""AdamW math over flat fp32 tensors (Loshchilov & Hutter 2019), identical to torch.optim.AdamW's
single-tensor path. ``decoupled=False`` is DeepSpeed's Adam with ``adam_w_mode=false`` (L2 in the grad).
With ``use_kernel`` the fused Triton kernel does the same in one pass."""

from __future__ import annotations

import math

import torch


def adamw_update(
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
    decoupled: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
    use_kernel: bool = False,
    out: torch.Tensor | None = None,
) -> None:
    """One in-place update. ``grad`` is multiplied by ``grad_scale`` (unscale x clip) first. The caller has
    already checked that the gradients are finite (their global norm), so the kernel makes one pass.
    ``out`` (kernel path only: the caller copies otherwise) receives the updated weights in its dtype."""
    if use_kernel and decoupled and bias_correction:
        from engine import kernels

        kernels.adamw_(
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
            grad_scale=1.0 / grad_scale,
            check_finite=False,
            out=out,
        )  # the caller skipped the step on a non-finite norm
        return
    g = grad.float() * grad_scale if grad_scale != 1.0 else grad.float()
    if weight_decay != 0.0:
        if decoupled:
            param.mul_(1.0 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if out is not None:
        out.copy_(param)
