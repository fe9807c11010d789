"""Fused LayerNorm and RMSNorm (forward and backward) over the last dimension.

One row per program in the forward; statistics are fp32 whatever the input dtype. Rows longer than one
block are walked in BLOCK_N chunks, so any hidden size works. The backward computes dx row by row and
accumulates dweight/dbias into one fp32 partial row per program (a (G, N) buffer that stays in L2),
which a final ``sum(0)`` reduces: no atomics, no locks, deterministic.

No autotuner here: the backward accumulates into its partial buffer, so the autotuner's repeated
benchmark launches would corrupt it. Block size and warps follow the row length instead.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.dispatch import interpreting, launchable, use_triton


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input rows, row stride stride_x, unit column stride
    Y,  # (M, N) output rows in X's dtype, row stride stride_y
    W,  # (N,) weight
    B,  # (N,) bias; not read unless HAS_BIAS
    MEAN,  # (M,) fp32 row means saved for the backward; not written for RMSNorm
    RSTD,  # (M,) fp32 reciprocal standard deviations (RMSNorm: reciprocal root mean square)
    stride_x,
    stride_y,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,  # N <= BLOCK_N: one block per row, no chunk loop
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    if SINGLE:
        # the whole row fits one block: read x once and keep it in registers
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        mean = 0.0
        if not IS_RMS:
            mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        if not IS_RMS:
            tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                acc += tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / N
        # second pass on centred values: numerically safer than E[x^2] - E[x]^2
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
            x = tl.where(cols < N, x - mean, 0.0)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        if not IS_RMS:
            tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X,  # (M, N) forward input, row stride stride_x
    DY,  # (M, N) upstream gradient, row stride stride_dy
    DX,  # (M, N) output input-gradient in X's dtype, row stride stride_dx
    W,  # (N,) weight
    MEAN,  # (M,) fp32 row means from the forward; not read for RMSNorm
    RSTD,  # (M,) fp32 reciprocal std from the forward
    DW_PART,  # (G, N) fp32 zeros in: program g accumulates sum over its rows of dy * xhat into row g
    DB_PART,  # (G, N) fp32 zeros in: program g accumulates sum of dy; not written unless HAS_BIAS
    stride_x,
    stride_dy,
    stride_dx,
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,  # N <= BLOCK_N: rows held in registers, dweight/dbias summed there
    STAGES: tl.constexpr,  # software-pipelining depth of the row loop (SINGLE path)
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DW_PART += pid.to(tl.int64) * N
    DB_PART += pid.to(tl.int64) * N
    if SINGLE:
        # whole rows in registers: x and dy read once per row, dweight/dbias summed in registers and
        # written once per program
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # STAGES > 1 lets the compiler prefetch the next rows' x and dy while this row reduces
        for row in tl.range(row_start, row_end, num_stages=STAGES):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - xhat * c1 - c2) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        tl.store(DW_PART + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PART + cols, db_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            x_row = X + row * stride_x
            dy_row = DY + row * stride_dy
            dx_row = DX + row * stride_dx
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            # dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)); the last term only for LayerNorm
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = w * dy  # zero on masked columns, so the sums need no extra masking
                acc1 += (x - mean) * rstd * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                if IS_RMS:
                    dx = (w * dy - xhat * c1) * rstd
                else:
                    dx = (w * dy - xhat * c1 - c2) * rstd
                tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # this program owns row pid of the partial buffers: plain read-add-write, no race
                dw = tl.load(DW_PART + cols, mask=mask, other=0.0) + dy * xhat
                tl.store(DW_PART + cols, dw, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB_PART + cols, mask=mask, other=0.0) + dy
                    tl.store(DB_PART + cols, db, mask=mask)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _launch_config(n: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of length n."""
    if interpreting():
        # small chunks so that tiny test shapes still walk the multi-chunk loop (rows up to 64: one block)
        return min(triton.next_power_of_2(n), 64), 1
    block = min(triton.next_power_of_2(n), 8192)
    return block, min(max(block // 512, 1), 16)


# Backward launch settings, from tools/gpu_norm_sweep.py on an H100 (16384 x 4096 bf16): the row loop is
# latency-bound, so wide programs (16 warps), few partial rows and a 2-deep prefetch of the next row did
# best among warps {8, 16} x partials/SM {1, 2, 4} x stages {1, 2, 3}.
PARTIALS_PER_SM = 2
BWD_STAGES = 2
BWD_WARPS: int | None = None  # None: twice the forward's, at most 16


def _num_partials(m: int, device: torch.device) -> int:
    """How many programs (and fp32 partial rows) the backward uses."""
    if device.type == "cuda":
        return max(1, min(m, PARTIALS_PER_SM * _sm_count(device.index)))
    return max(1, min(m, 4))


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., N) -> (M, N) with unit column stride
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool):
        shape = x.shape
        x2 = _rows(x)
        m, n = x2.shape
        weight = weight.contiguous()
        bias_c = bias.contiguous() if bias is not None else weight
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block, warps = _launch_config(n, x.device)
        kernel, _ = launchable(_norm_fwd_kernel)
        kernel[(m,)](
            x2,
            y,
            weight,
            bias_c,
            mean,
            rstd,
            x2.stride(0),
            y.stride(0),
            n,
            eps,
            IS_RMS=is_rms,
            HAS_BIAS=bias is not None,
            BLOCK_N=block,
            SINGLE=n <= block,
            num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.is_rms, ctx.shape = bias is not None, is_rms, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        groups = _num_partials(m, x2.device)
        dw_part = torch.zeros((groups, n), dtype=torch.float32, device=x2.device)
        db_part = torch.zeros((groups, n), dtype=torch.float32, device=x2.device) if ctx.has_bias else dw_part
        block, warps = _launch_config(n, x2.device)
        kernel, _ = launchable(_norm_bwd_kernel)
        kernel[(groups,)](
            x2,
            dy2,
            dx,
            weight,
            mean,
            rstd,
            dw_part,
            db_part,
            x2.stride(0),
            dy2.stride(0),
            dx.stride(0),
            m,
            n,
            triton.cdiv(m, groups),
            IS_RMS=ctx.is_rms,
            HAS_BIAS=ctx.has_bias,
            BLOCK_N=block,
            SINGLE=n <= block,
            STAGES=1 if interpreting() else BWD_STAGES,
            num_warps=warps if interpreting() else (BWD_WARPS or min(2 * warps, 16)),
        )
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw, db, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"norm weight/bias must have shape ({n},) to match x's last dimension, got "
            f"{tuple(weight.shape)}" + ("" if bias is None else f" and {tuple(bias.shape)}")
        )


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., H) with fp32 statistics; returns x's dtype."""
    _check(x, weight, bias)
    if not use_triton(x, weight):
        return reference.layer_norm(x, weight, bias, eps)
    return _NormFunction.apply(x, weight, bias, eps, False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x (..., H) with fp32 statistics; returns x's dtype."""
    _check(x, weight, None)
    if not use_triton(x, weight):
        return reference.rms_norm(x, weight, eps)
    return _NormFunction.apply(x, weight, None, eps, True)
