"""Public FlashAttention-2 style attention: shape checks, launches and the autograd Functions.

Kernels live in ``attention_fwd.py`` and ``attention_bwd.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from engine.kernels import reference
from engine.kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from engine.kernels.attention_fwd import LOG2E, attn_fwd_kernel
from engine.kernels.dispatch import interpreting, launchable, use_triton

# under the interpreter: small tiles so tiny test sequences span several blocks (and the causal skip)
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch(kernel, seq: int, programs: int, *args, block_key: str, **meta) -> None:
    """Launch an attention kernel over (cdiv(seq, meta[block_key]), programs) programs."""
    fn, tuned = launchable(kernel)
    if tuned:
        fn[lambda m: (triton.cdiv(seq, m[block_key]), programs)](*args, **meta)
    else:
        fn[(triton.cdiv(seq, _INTERPRET_BLOCKS[block_key]), programs)](*args, **meta, **_INTERPRET_BLOCKS)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Meta(NamedTuple):
    """What the backward launches need from the forward's."""

    causal: bool
    scale: float
    has_alibi: bool
    block_d: int
    precision: str
    upcast: bool


def _forward(q, k, v, out, causal: bool, scale: float, slopes) -> tuple[torch.Tensor, torch.Tensor, _Meta]:
    """Launch the forward into ``out`` (B, H, S, D), any (b, h, s) strides. Returns (lse, slopes_arg, meta)."""
    batch, heads, seq, dim = q.shape
    block_d = max(16, triton.next_power_of_2(dim))
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    has_alibi = slopes is not None
    slopes_arg = slopes if has_alibi else lse
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = interpreting() and q.dtype == torch.bfloat16
    _launch(
        attn_fwd_kernel,
        seq,
        batch * heads,
        q,
        k,
        v,
        out,
        lse,
        slopes_arg,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        heads // k.shape[1],
        seq,
        dim,
        scale * LOG2E,
        CAUSAL=causal,
        HAS_ALIBI=has_alibi,
        DOT_PRECISION=precision,
        UPCAST_DOT=upcast,
        BLOCK_D=block_d,
        block_key="BLOCK_M",
    )
    return lse, slopes_arg, _Meta(causal, scale, has_alibi, block_d, precision, upcast)


def _backward(q, k, v, out, dout, lse, slopes_arg, dq, dk, dv, meta: _Meta) -> None:
    """Launch the backward: reads out/dout, writes dq (B, H, S, D) and dk/dv (B, Hkv, S, D) in place.

    Every (B, *, S, D) operand may have any (b, h, s) strides, unit stride along D.
    """
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    delta = torch.empty_like(lse)
    pre_block = 16 if seq < 64 else 64
    pre, _ = launchable(attn_bwd_preprocess_kernel)
    pre[(triton.cdiv(seq, pre_block), batch * heads)](
        out, dout, delta, *_strides(out), *_strides(dout), heads, seq, dim, BLOCK_M=pre_block, BLOCK_D=meta.block_d
    )
    common = dict(
        CAUSAL=meta.causal,
        HAS_ALIBI=meta.has_alibi,
        DOT_PRECISION=meta.precision,
        UPCAST_DOT=meta.upcast,
        BLOCK_D=meta.block_d,
    )
    _launch(
        attn_bwd_dkdv_kernel,
        seq,
        batch * kv_heads,
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        slopes_arg,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        *_strides(dk),
        *_strides(dv),
        heads,
        kv_heads,
        heads // kv_heads,
        seq,
        dim,
        meta.scale,
        meta.scale * LOG2E,
        block_key="BLOCK_N",
        **common,
    )
    _launch(
        attn_bwd_dq_kernel,
        seq,
        batch * heads,
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        slopes_arg,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        *_strides(dq),
        heads,
        heads // kv_heads,
        seq,
        dim,
        meta.scale,
        meta.scale * LOG2E,
        block_key="BLOCK_M",
        **common,
    )


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, slopes):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse, slopes_arg, ctx.meta = _forward(q, k, v, out, causal, scale, slopes)
        ctx.save_for_backward(q, k, v, out, lse, slopes_arg)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes_arg = ctx.saved_tensors
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        _backward(q, k, v, out, _unit_last(dout), lse, slopes_arg, dq, dk, dv, ctx.meta)
        return dq, dk, dv, None, None, None


def _split_packed(t: torch.Tensor, n_heads: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """(S, B, (n_heads + 2 kv_heads) * D) with unit last stride -> q (B, n_heads, S, D), k, v (B, kv_heads, S, D)
    views (no copy)."""
    heads = t.unflatten(-1, (n_heads + 2 * kv_heads, -1)).permute(1, 2, 0, 3)
    return heads[:, :n_heads], heads[:, n_heads : n_heads + kv_heads], heads[:, n_heads + kv_heads :]


def _heads_view(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(S, B, n_heads * D) with unit last stride -> its (B, n_heads, S, D) view."""
    return t.unflatten(-1, (n_heads, -1)).permute(1, 2, 0, 3)


class _PackedAttentionFunction(torch.autograd.Function):
    """Attention on a packed (S, B, (h + 2 kv) * D) qkv: the kernels read q/k/v, write the (S, B, h * D)
    output, read dout and write one (S, B, (h + 2 kv) * D) dqkv through strides, with no copies."""

    @staticmethod
    def forward(ctx, qkv, n_heads: int, kv_heads: int, causal: bool, scale: float, slopes):
        qkv = _unit_last(qkv)
        q, k, v = _split_packed(qkv, n_heads, kv_heads)
        seq, batch, dim = qkv.shape[0], qkv.shape[1], q.shape[-1]
        out = torch.empty((seq, batch, n_heads * dim), dtype=qkv.dtype, device=qkv.device)
        lse, slopes_arg, ctx.meta = _forward(q, k, v, _heads_view(out, n_heads), causal, scale, slopes)
        ctx.save_for_backward(qkv, out, lse, slopes_arg)
        ctx.n_heads, ctx.kv_heads = n_heads, kv_heads
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, slopes_arg = ctx.saved_tensors
        n_heads, kv_heads = ctx.n_heads, ctx.kv_heads
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _backward(
            *_split_packed(qkv, n_heads, kv_heads),
            _heads_view(out, n_heads),
            _heads_view(_unit_last(dout), n_heads),
            lse,
            slopes_arg,
            *_split_packed(dqkv, n_heads, kv_heads),
            ctx.meta,
        )
        return dqkv, None, None, None, None, None


def _check_offsets(*views: torch.Tensor) -> None:
    """The kernels add batch/head offsets in 64 bits but index rows within a head in 32 bits:
    the last offset, (S - 1) * seq_stride + D - 1, must fit an int32 for every (B, H, S, D) view they touch."""
    for t in views:
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] - 1 > 2**31 - 1:
            raise ValueError(
                f"attention: a (B, H, S, D) = {tuple(t.shape)} operand with sequence stride {t.stride(2)} "
                "reaches past element 2**31 - 1 within one head, beyond the kernels' 32-bit row offsets "
                "(hint: use fewer tokens per micro-batch)"
            )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention expects q (B, H, S, D) and k, v (B, Hkv, S, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} must share batch, seq and head_dim with q {tuple(q.shape)}")
    if h % k.shape[1] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({k.shape[1]}) for grouped-query attention")
    if slopes is not None and slopes.shape != (h,):
        raise ValueError(f"alibi_slopes must have shape ({h},), got {tuple(slopes.shape)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + alibi + causal mask) V for q (B, H, S, D), k/v (B, Hkv, S, D), H % Hkv == 0.

    ``softmax_scale`` defaults to 1/sqrt(D). ``alibi_slopes`` (H,) adds ``-slope * |i - j|``. Returns
    (B, H, S, D) in q's dtype.
    """
    _check(q, k, v, alibi_slopes)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not use_triton(q, k, v):
        return reference.attention(q, k, v, causal=causal, softmax_scale=scale, alibi_slopes=alibi_slopes)
    _check_offsets(q, k, v)
    slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    return _AttentionFunction.apply(q, k, v, causal, scale, slopes)


def _check_packed(qkv: torch.Tensor, n_heads: int, kv_heads: int, slopes: torch.Tensor | None) -> int:
    """Validate attention_packed's arguments; returns head_dim."""
    if qkv.dim() != 3:
        raise ValueError(
            f"attention_packed expects qkv (S, B, (n_heads + 2 * kv_heads) * head_dim); got shape {tuple(qkv.shape)}"
        )
    if n_heads < 1 or kv_heads < 1:
        raise ValueError(f"n_heads ({n_heads}) and kv_heads ({kv_heads}) must be positive")
    if n_heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({n_heads}) must be a multiple of kv heads ({kv_heads}) for grouped-query attention"
        )
    packed = n_heads + 2 * kv_heads
    width = qkv.shape[-1]
    if width == 0 or width % packed != 0:
        raise ValueError(
            f"qkv {tuple(qkv.shape)}: last dim {width} is not a positive multiple of n_heads + 2 * kv_heads "
            f"= {n_heads} + 2 * {kv_heads} = {packed}"
        )
    if slopes is not None and slopes.shape != (n_heads,):
        raise ValueError(f"alibi_slopes must have shape ({n_heads},), got {tuple(slopes.shape)}")
    return width // packed


def attention_packed(
    qkv: torch.Tensor,
    n_heads: int,
    kv_heads: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention straight from a packed qkv projection, in the model's (S, B, hidden) layout.

    ``qkv`` is (S, B, (n_heads + 2 * kv_heads) * D): the n_heads query heads, then the kv_heads key heads,
    then the kv_heads value heads, each head's D features contiguous. Returns (S, B, n_heads * D) in qkv's
    dtype, contiguous; its gradient w.r.t. qkv is one contiguous (S, B, (n_heads + 2 * kv_heads) * D)
    tensor. Equals ``attention(q, k, v)`` on the (B, heads, S, D) views, its output permuted back to
    (S, B, n_heads * D). ``n_heads % kv_heads == 0`` (grouped-query attention); ``softmax_scale`` defaults
    to 1/sqrt(D); ``alibi_slopes`` (n_heads,) adds ``-slope * |i - j|``.
    """
    dim = _check_packed(qkv, n_heads, kv_heads, alibi_slopes)
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else float(softmax_scale)
    if not use_triton(qkv):
        seq, batch = qkv.shape[0], qkv.shape[1]
        q, k, v = _split_packed(qkv, n_heads, kv_heads)
        out = reference.attention(q, k, v, causal=causal, softmax_scale=scale, alibi_slopes=alibi_slopes)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, n_heads * dim)
    _check_offsets(*_split_packed(qkv, n_heads, kv_heads))
    slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    return _PackedAttentionFunction.apply(qkv, n_heads, kv_heads, causal, scale, slopes)
