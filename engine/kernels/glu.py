"""Fused SwiGLU activation (Llama's MLP, Shazeer 2020), forward and backward.

``swiglu(x) = silu(gate) * up`` for x (..., 2F) = [gate | up], the up-projection's output as the model
computes it (one GEMM for both halves). Unfused, torch runs silu and the product as separate kernels and
its backward runs three more plus a concatenation of d(gate) and d(up) into the (..., 2F) gradient. Here
the forward reads x once and writes y (..., F); the backward reads dy and x once and writes both halves of
dx straight into one (..., 2F) tensor. Math in fp32, one rounding per output.

With s = sigmoid(g): silu(g) = g s, silu'(g) = s (1 + g (1 - s)); d(up) = dy silu(g),
d(gate) = dy up silu'(g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import reference
from engine.kernels.dispatch import interpreting, launchable, use_triton


@triton.jit
def _sigmoid_and_complement(g):
    """(sigmoid(g), 1 - sigmoid(g)) from e = exp(-|g|) in (0, 1]: no overflow, no cancellation."""
    e = tl.exp(-tl.abs(g))
    r = 1.0 / (1.0 + e)
    pos = g >= 0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def _load_tile(X, stride_x, M, F, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (rows, cols, mask) and its fp32 [BLOCK_M, BLOCK_N] tiles of gate and up."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    x_ptr = X + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + F, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, gate, up


@triton.jit
def _swiglu_fwd_kernel(
    X,  # (M, 2F) [gate | up], row stride stride_x, unit column stride
    Y,  # (M, F) out in X's dtype, row stride stride_y
    stride_x,
    stride_y,
    M,
    F,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask, gate, up = _load_tile(X, stride_x, M, F, BLOCK_M, BLOCK_N)
    s, _ = _sigmoid_and_complement(gate)
    y = gate * s * up
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,  # (M, F) upstream gradient, row stride stride_dy, unit column stride
    X,  # (M, 2F) saved [gate | up], row stride stride_x
    DX,  # (M, 2F) out: [d gate | d up] in X's dtype, row stride stride_dx
    stride_dy,
    stride_x,
    stride_dx,
    M,
    F,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask, gate, up = _load_tile(X, stride_x, M, F, BLOCK_M, BLOCK_N)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s, one_minus_s = _sigmoid_and_complement(gate)
    silu = gate * s
    dgate = dy * up * s * (1.0 + gate * one_minus_s)
    dx_ptr = DX + rows[:, None] * stride_dx + cols[None, :]
    tl.store(dx_ptr, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + F, (dy * silu).to(DX.dtype.element_ty), mask=mask)


# Launch settings for an H100 (checked with ptxas, not yet timed on one): 2-D tiles of TILE elements per
# half, 128-column blocks (256 bytes of a bf16 row per half), NUM_WARPS warps.
TILE = 2048
MAX_BLOCK_N = 128
NUM_WARPS = 4


def _blocks(m: int, f: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps)."""
    if interpreting():
        # small tiles so that tiny test shapes span several row and column blocks
        return 4, min(triton.next_power_of_2(f), 16), 1
    block_n = min(triton.next_power_of_2(f), MAX_BLOCK_N)
    return max(1, min(TILE // block_n, triton.next_power_of_2(m))), block_n, NUM_WARPS


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., N) -> (M, N) with unit column stride
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = _rows(x)
        m, f = x2.shape[0], x2.shape[1] // 2
        y = torch.empty((m, f), dtype=x.dtype, device=x.device)
        block_m, block_n, warps = _blocks(m, f)
        kernel, _ = launchable(_swiglu_fwd_kernel)
        kernel[(triton.cdiv(m, block_m), triton.cdiv(f, block_n))](
            x2, y, x2.stride(0), y.stride(0), m, f, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
        )
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        m, f = x2.shape[0], x2.shape[1] // 2
        dy2 = _rows(dy)
        dx = torch.empty((m, 2 * f), dtype=x2.dtype, device=x2.device)
        block_m, block_n, warps = _blocks(m, f)
        kernel, _ = launchable(_swiglu_bwd_kernel)
        kernel[(triton.cdiv(m, block_m), triton.cdiv(f, block_n))](
            dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0), m, f,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        return dx.view(ctx.shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x (..., 2F) = [gate | up]; returns (..., F) in x's dtype (fp32 math)."""
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(
            f"swiglu expects x (..., 2F) = [gate | up] with an even, non-zero last dimension; "
            f"got shape {tuple(x.shape)}"
        )
    if not use_triton(x) or x.numel() == 0:
        return reference.swiglu(x)
    return _SwiGLUFunction.apply(x)
