"""Public FlashAttention-2 style attention: shape checks, launches and the autograd Function.

Kernels live in ``attention_fwd.py`` and ``attention_bwd.py``.
"""

from __future__ import annotations

import math

import torch
import triton

from kernels import reference
from kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from kernels.attention_fwd import LOG2E, attn_fwd_kernel
from kernels.dispatch import interpreting, launchable, use_triton

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


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, slopes):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        batch, heads, seq, dim = q.shape
        block_d = max(16, triton.next_power_of_2(dim))
        out = torch.empty((batch, heads, seq, dim), dtype=q.dtype, device=q.device)
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
        ctx.save_for_backward(q, k, v, out, lse, slopes_arg)
        ctx.causal, ctx.scale, ctx.has_alibi, ctx.block_d = causal, scale, has_alibi, block_d
        ctx.precision, ctx.upcast = precision, upcast
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes_arg = ctx.saved_tensors
        dout = dout.contiguous()
        batch, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        delta = torch.empty_like(lse)
        pre_block = 16 if seq < 64 else 64
        pre, _ = launchable(attn_bwd_preprocess_kernel)
        pre[(triton.cdiv(seq, pre_block), batch * heads)](
            out, dout, delta, seq, dim, BLOCK_M=pre_block, BLOCK_D=ctx.block_d
        )
        dq = torch.empty((batch, heads, seq, dim), dtype=q.dtype, device=q.device)
        dk = torch.empty((batch, kv_heads, seq, dim), dtype=k.dtype, device=k.device)
        dv = torch.empty((batch, kv_heads, seq, dim), dtype=v.dtype, device=v.device)
        common = dict(
            CAUSAL=ctx.causal,
            HAS_ALIBI=ctx.has_alibi,
            DOT_PRECISION=ctx.precision,
            UPCAST_DOT=ctx.upcast,
            BLOCK_D=ctx.block_d,
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
            heads,
            kv_heads,
            heads // kv_heads,
            seq,
            dim,
            ctx.scale,
            ctx.scale * LOG2E,
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
            heads,
            heads // kv_heads,
            seq,
            dim,
            ctx.scale,
            ctx.scale * LOG2E,
            block_key="BLOCK_M",
            **common,
        )
        return dq, dk, dv, None, None, None


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
        raise ValueError(
            f"query heads ({h}) must be a multiple of kv heads ({k.shape[1]}) for grouped-query attention"
        )
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
    slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    return _AttentionFunction.apply(q, k, v, causal, scale, slopes)
