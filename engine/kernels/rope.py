"""Rotary position embedding applied to a packed qkv projection in the model's (S, B, ·) layout.

``rope_packed(qkv, cos, sin, n_heads, kv_heads)`` rotates every query and key head of a
(S, B, (n_heads + 2 * kv_heads) * D) projection by its position's angles and passes the value heads
through, in one pass: the result feeds ``attention_packed`` directly, so a rotary model's attention
makes no layout copies either. Pairs are interleaved, (x[2i], x[2i+1]) rotated by angle s * f_i at
position s, as engine.model.positions.apply_rope (Meta's Llama convention); math in fp32, one rounding.

The rotation is orthogonal, so the backward is the same kernel with the angles negated: one pass over the
gradient, no saved activations beyond the (S, D/2) tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import reference
from engine.kernels.dispatch import interpreting, launchable, use_triton


@triton.jit
def _rope_kernel(
    X,  # (M, W) rows of the packed projection, row stride stride_x, unit column stride; M = S * B
    Y,  # (M, W) out, row stride stride_y
    COS,  # (S, D/2) fp32, row stride stride_t
    SIN,  # (S, D/2) fp32, row stride stride_t
    stride_x,
    stride_y,
    stride_t,
    M,
    batch,  # B: row r holds position r // B
    half,  # D / 2
    rotated_heads,  # n_heads + kv_heads: heads past these (the values) are copied unchanged
    sign,  # +1.0 forward, -1.0 backward (the inverse rotation)
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (pairs < half)[None, :]
    cols = head * 2 * half + 2 * pairs  # even member of each pair
    x_ptr = X + rows[:, None] * stride_x + cols[None, :]
    y_ptr = Y + rows[:, None] * stride_y + cols[None, :]
    x_even = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    pos = rows // batch
    t_off = pos[:, None] * stride_t + pairs[None, :]
    rotate = head < rotated_heads  # value heads: cos 1, sin 0 (a copy)
    c = tl.where(rotate, tl.load(COS + t_off, mask=mask, other=1.0), 1.0)
    s = tl.where(rotate, tl.load(SIN + t_off, mask=mask, other=0.0), 0.0) * sign
    tl.store(y_ptr, (x_even * c - x_odd * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + 1, (x_even * s + x_odd * c).to(Y.dtype.element_ty), mask=mask)


def _launch(
    x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, batch: int, heads: int, rotated: int, sign: float
) -> torch.Tensor:
    m, width = x2.shape
    half = width // heads // 2
    y = torch.empty((m, width), dtype=x2.dtype, device=x2.device)
    block_h = triton.next_power_of_2(half)
    if interpreting():
        block_r, warps = 4, 1
    else:
        block_r, warps = max(1, min(32, 1024 // block_h)), 8  # ~1024 pairs per program: 39 registers, no spill
    kernel, _ = launchable(_rope_kernel)
    kernel[(triton.cdiv(m, block_r), heads)](
        x2, y, cos, sin, x2.stride(0), y.stride(0), cos.stride(0), m, batch, half, rotated, sign,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    return y


class _RopePackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads: int, rotated: int):
        seq, batch, width = qkv.shape
        x2 = qkv.reshape(seq * batch, width)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.heads, ctx.rotated = qkv.shape, heads, rotated
        return _launch(x2, cos, sin, batch=batch, heads=heads, rotated=rotated, sign=1.0).view(seq, batch, width)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        seq, batch, width = ctx.shape
        dy2 = dy.reshape(seq * batch, width)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = _launch(dy2, cos, sin, batch=batch, heads=ctx.heads, rotated=ctx.rotated, sign=-1.0)
        return dx.view(seq, batch, width), None, None, None, None


def rope_packed(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, kv_heads: int) -> torch.Tensor:
    """Rotate the query and key heads of qkv (S, B, (n_heads + 2 * kv_heads) * D) by positions 0..S-1.

    ``cos``/``sin`` are (>= S, D/2) fp32 tables (engine.model.positions.rope_tables). Returns a new tensor
    of qkv's shape and dtype: rotated query heads, rotated key heads, the value heads unchanged.
    """
    if qkv.dim() != 3:
        raise ValueError(f"rope_packed expects qkv (S, B, (n_heads + 2 * kv_heads) * D); got {tuple(qkv.shape)}")
    heads = n_heads + 2 * kv_heads
    seq, _, width = qkv.shape
    if n_heads < 1 or kv_heads < 1 or width % heads or (width // heads) % 2:
        raise ValueError(
            f"rope_packed: qkv last dim {width} is not n_heads + 2 * kv_heads = {heads} heads of an even head_dim"
        )
    half = width // heads // 2
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != half or cos.shape[0] < seq:
        raise ValueError(
            f"rope_packed: cos/sin must be (>= {seq}, {half}), got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if not use_triton(qkv):
        return reference.rope_packed(qkv, cos, sin, n_heads, kv_heads)
    # (S, D/2) fp32 tables: tiny, so made contiguous (the kernel indexes both with one row stride)
    cos32, sin32 = cos[:seq].float().contiguous(), sin[:seq].float().contiguous()
    return _RopePackedFunction.apply(qkv, cos32, sin32, heads, n_heads + kv_heads)
