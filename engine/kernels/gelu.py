"""Fused bias add + tanh-approximated GELU (GPT-2's MLP activation), forward and backward.

``bias_gelu(h, bias) = gelu_tanh(h + bias)`` for h (..., N) and bias (N,), so the up-projection can run
F.linear without its bias. The forward reads h and bias once and writes the activation in h's dtype;
it saves h (not h + bias) and bias, the same memory torch keeps for its GELU input. The backward reads
dy and h once, writes dh = dy * gelu'(h + bias) in h's dtype and, in the same pass, sums dh over rows
(in fp32, before dh is rounded) for the bias gradient: unfused, that sum is another full read of a
(tokens, 4 * hidden) tensor.

All math is fp32. With ``z = 2 * sqrt(2/pi) * (x + 0.044715 x^3)`` and ``s = sigmoid(z)``:
``0.5 * (1 + tanh(z / 2)) = s``, so ``gelu(x) = x * s`` and ``gelu'(x) = s + x * s * (1 - s) * dz/dx``.
No tanh intrinsic is needed (tl has none): with ``e = exp(-|z|)`` (in (0, 1], never overflowing) and
``r = 1 / (1 + e)``, ``s = r`` for z >= 0 and ``e * r`` otherwise, and ``s * (1 - s) = e * r^2`` exactly,
so large |h| saturates to y = x or 0 and gelu' = 1 or 0 without infs, nans or cancellation.

Grids: the forward is one program per [BLOCK_M, BLOCK_N] tile (a 1-D grid, column blocks fastest). The
backward launches a few programs per SM; each owns one column block and a range of rows, walks its
rows in BLOCK_M tiles keeping a [BLOCK_M, BLOCK_N] fp32 accumulator in registers, and writes one fp32
partial row of the bias gradient; a final ``sum(0)`` over the (G, N) partials gives dbias. No atomics:
deterministic. No autotuner, for the same reason as the norm backward (benchmark re-launches).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from engine.kernels import reference
from engine.kernels.dispatch import interpreting, launchable, use_triton

# z = 2 * sqrt(2/pi) * (x + 0.044715 x^3) = x * (_C + _CK * x^2); dz/dx = _C + 3 * _CK * x^2
_C = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
_CK = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi) * 0.044715)


@triton.jit
def _bias_gelu_fwd_kernel(
    H,  # (M, N) pre-activation without bias, row stride stride_h, unit column stride
    B,  # (N,) bias
    Y,  # (M, N) output in H's dtype, row stride stride_y
    stride_h,
    stride_y,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    # column blocks fastest: neighbouring programs read neighbouring memory
    pid_m = pid // n_blocks
    pid_n = pid % n_blocks
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = h + b[None, :]
    z = x * (_C + _CK * x * x)
    e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows
    r = 1.0 / (1.0 + e)
    s = tl.where(z >= 0, r, e * r)  # sigmoid(z) = 0.5 * (1 + tanh(z / 2))
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (x * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) upstream gradient, row stride stride_dy, unit column stride
    H,  # (M, N) saved pre-activation without bias, row stride stride_h
    B,  # (N,) bias
    DH,  # (M, N) output gradient in H's dtype, row stride stride_dh
    DB_PART,  # (G, N) fp32: program (g, column block) writes its rows' column sums of dh into row g
    stride_dy,
    stride_h,
    stride_dh,
    M,
    N,
    rows_per_program,  # a multiple of BLOCK_M
    HAS_DBIAS: tl.constexpr,  # False: the bias needs no gradient, DB_PART is not written
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,  # software-pipelining depth of the row-tile loop
):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    group = pid // n_blocks
    pid_n = pid % n_blocks
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_start = group.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = h + b[None, :]
        x2 = x * x
        z = x * (_C + _CK * x2)
        e = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + e)
        s = tl.where(z >= 0, r, e * r)
        # sigmoid'(z) = s * (1 - s) = e * r^2 (no cancellation in 1 - s as s -> 1)
        dh = dy * (s + x * (e * r * r) * (_C + 3.0 * _CK * x2))  # zero where masked (dy is 0 there)
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            acc += dh  # fp32 dh, before rounding; reduced across rows once, after the loop
    if HAS_DBIAS:
        tl.store(DB_PART + group.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_mask)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()
    ).multi_processor_count


# Launch settings for an H100 (checked with ptxas, not yet timed on one): tiles BLOCK_N = 256 columns wide
# (512 bytes of a bf16 row, 16-byte vectors), NUM_WARPS warps. The forward's FWD_TILE-element tiles give
# 32 elements per thread (54 registers). The backward's BWD_TILE-element tiles give 8 per thread (48
# registers; 16 per thread needed 95, 32 needed 162): PROGRAMS_PER_SM programs of 4 warps then all fit on
# an SM at once (10 would), one wave with no tail, each with a tile of dy and h in flight: ~32 KB per SM,
# above what hides DRAM latency at full bandwidth. BWD_STAGES = 2 (cp.async prefetch of the next tile
# through shared memory, 56 registers) is the first thing to sweep on a GPU.
FWD_TILE = 4096
BWD_TILE = 1024
MAX_BLOCK_N = 256
NUM_WARPS = 4
PROGRAMS_PER_SM = 8
BWD_STAGES = 1


def _blocks(m: int, n: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for an (m, n) problem and tiles of about ``tile`` elements."""
    if interpreting():
        # small tiles so that tiny test shapes span several column blocks and row tiles
        return 4, min(triton.next_power_of_2(n), 32), 1
    block_n = min(triton.next_power_of_2(n), MAX_BLOCK_N)
    block_m = min(max(tile // block_n, 1), triton.next_power_of_2(m))
    return block_m, block_n, NUM_WARPS


def _row_groups(m: int, n_blocks: int, block_m: int, device: torch.device) -> int:
    """How many row ranges the backward splits the rows into (programs = row groups x column blocks)."""
    target = PROGRAMS_PER_SM * _sm_count(device.index) if device.type == "cuda" else 3 * n_blocks
    return max(1, min(triton.cdiv(m, block_m), target // n_blocks))


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., N) -> (M, N) with unit column stride
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        shape = h.shape
        h2 = _rows(h)
        m, n = h2.shape
        bias_c = bias.contiguous()
        y = torch.empty((m, n), dtype=h.dtype, device=h.device)
        block_m, block_n, warps = _blocks(m, n, FWD_TILE)
        kernel, _ = launchable(_bias_gelu_fwd_kernel)
        kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
            h2,
            bias_c,
            y,
            h2.stride(0),
            y.stride(0),
            m,
            n,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=warps,
        )
        ctx.save_for_backward(h2, bias_c)
        ctx.shape, ctx.bias_dtype = shape, bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        h2, bias = ctx.saved_tensors
        m, n = h2.shape
        dy2 = _rows(dy)
        dh = torch.empty((m, n), dtype=h2.dtype, device=h2.device)
        has_dbias = ctx.needs_input_grad[1]
        block_m, block_n, warps = _blocks(m, n, BWD_TILE)
        n_blocks = triton.cdiv(n, block_n)
        groups = _row_groups(m, n_blocks, block_m, h2.device)
        # whole tiles per program; the count of row groups may shrink after rounding
        rows_per_program = triton.cdiv(triton.cdiv(m, groups), block_m) * block_m
        groups = triton.cdiv(m, rows_per_program)
        # every (group, column) entry is written exactly once, so no zero fill is needed
        db_part = torch.empty((groups, n) if has_dbias else (1,), dtype=torch.float32, device=h2.device)
        kernel, _ = launchable(_bias_gelu_bwd_kernel)
        kernel[(groups * n_blocks,)](
            dy2,
            h2,
            bias,
            dh,
            db_part,
            dy2.stride(0),
            h2.stride(0),
            dh.stride(0),
            m,
            n,
            rows_per_program,
            HAS_DBIAS=has_dbias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            STAGES=1 if interpreting() else BWD_STAGES,
            num_warps=warps,
        )
        dbias = db_part.sum(0).to(ctx.bias_dtype) if has_dbias else None
        return dh.view(ctx.shape), dbias


def _check(h: torch.Tensor, bias: torch.Tensor) -> None:
    if h.dim() == 0 or bias.shape != (h.shape[-1],):
        n = h.shape[-1] if h.dim() else "N"
        raise ValueError(
            f"bias_gelu bias must have shape ({n},) to match h's last dimension, got bias "
            f"{tuple(bias.shape)} for h {tuple(h.shape)}"
        )


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(h + bias) for h (..., N) and bias (N,), fp32 math; returns h's dtype.

    Differentiable in h and bias; the bias gradient is summed in fp32 and returned in bias's dtype.
    """
    _check(h, bias)
    if not use_triton(h, bias) or h.numel() == 0:
        return reference.bias_gelu(h, bias)
    return _BiasGeluFunction.apply(h, bias)
