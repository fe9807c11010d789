"""The optimizer step shared by plain data parallelism and ZeRO, after the gradients are reduced:

    squared gradient norm (summed over every rank that holds a part) -> unscale -> skip on inf/nan ->
    clip coefficient -> AdamW on the fp32 masters (unscale and clip folded into one gradient scale)

The optimizers differ only in where the flat buffers live (whole on each rank, or DP shards) and how the
new parameters get back to the model; both call :func:`check_gradients` and :func:`adamw_step`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.config import OptimizerConfig
from engine.optim.adamw import adamw_update


@dataclass
class StepResult:
    skipped: bool
    grad_norm: float  # of the unscaled, unclipped gradients; inf/nan on overflow
    clip_coef: float


def check_gradients(grad_sq_sum: float, *, loss_scale: float, clip: float) -> StepResult:
    """The step's verdict from the global sum of squared (loss-scaled) gradients: skipped on inf/nan
    (identically on every rank, since all see the same sum), else the norm and the clip coefficient
    (DeepSpeed / torch ``clip_grad_norm_``: max_norm / (norm + 1e-6) when that is below 1; ``clip`` 0: off)."""
    if not math.isfinite(grad_sq_sum):
        return StepResult(
            skipped=True, grad_norm=float("nan") if math.isnan(grad_sq_sum) else float("inf"), clip_coef=1.0
        )
    norm = math.sqrt(grad_sq_sum) / loss_scale
    clip_coef = min(1.0, clip / (norm + 1e-6)) if clip > 0.0 else 1.0
    return StepResult(skipped=False, grad_norm=norm, clip_coef=clip_coef)


@dataclass
class Segment:
    """A contiguous run of fp32 optimizer state with one weight decay; ``out`` (fused path) receives the
    updated weights in the compute dtype."""

    master: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    weight_decay: float
    out: torch.Tensor | None = None


def adamw_step(
    segments: Iterable[Segment],
    cfg: OptimizerConfig,
    *,
    lr: float,
    step: int,
    loss_scale: float,
    result: StepResult,
    use_kernels: bool,
) -> None:
    """AdamW update ``step`` (1-based) of every segment, the gradients scaled by clip_coef / loss_scale."""
    p = cfg.params
    for s in segments:
        adamw_update(
            s.master,
            s.grad,
            s.exp_avg,
            s.exp_avg_sq,
            lr=lr,
            beta1=p.betas[0],
            beta2=p.betas[1],
            eps=p.eps,
            weight_decay=s.weight_decay,
            step=step,
            decoupled=cfg.decoupled,
            bias_correction=p.bias_correction,
            grad_scale=result.clip_coef / loss_scale,
            use_kernel=use_kernels,
            out=s.out,
        )
