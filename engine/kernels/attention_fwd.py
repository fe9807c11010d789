"""FlashAttention-2 forward kernel: tiled online softmax, never an S x S matrix in memory.

One program per (BLOCK_M query rows, batch*head). Scores live in the log2 domain (scale folded with
log2(e), so ``exp2`` replaces ``exp``); the kernel saves the per-row log2-sum-exp for the backward.
Causal programs stop at their diagonal block (block skipping). Grouped-query attention: query head h
reads kv head ``h // GROUP``. Head dims that are not a power of two are padded to BLOCK_D by masked loads.
Q, K, V and OUT are addressed through their (b, h, s) strides (unit stride along D), so they may be
views into a packed (S, B, heads, D) buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): folds exp into exp2


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with an fp32 accumulator (operands in their dtype on the GPU's tensor cores)."""
    if UPCAST_DOT:
        # Triton's CPU interpreter multiplies bf16 operands' raw bit patterns; compute its dots in fp32
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


def fwd_configs() -> list[triton.Config]:
    # CUDA only; the interpreter bypasses the autotuner (see engine.kernels.dispatch.launchable)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (128, 128, 8, 2),
            (64, 32, 4, 4),
        ]
    ]


@triton.autotune(configs=fwd_configs(), key=["S", "BLOCK_D", "CAUSAL", "HAS_ALIBI"])
@triton.jit
def attn_fwd_kernel(
    Q,  # (B, H, S, D) queries, unit stride along D
    K,  # (B, HKV, S, D) keys, unit stride along D
    V,  # (B, HKV, S, D) values, unit stride along D
    OUT,  # (B, H, S, D) out: attention output in Q's dtype, unit stride along D
    LSE,  # (B, H, S) fp32 out, contiguous: log2-sum-exp of the scaled (log2-domain) scores per query row
    SLOPES,  # (H,) fp32 ALiBi slopes; not read unless HAS_ALIBI
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    H,
    GROUP,  # query heads per kv head
    S,
    D,
    qk_scale,  # softmax_scale * log2(e)
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32), ignored for bf16/fp16
    UPCAST_DOT: tl.constexpr,  # interpreter + bf16 only, see mma
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < S) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, S)  # blocks right of the diagonal are all masked
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k_t = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N) = K^T
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        s = mma(q, k_t, DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_ALIBI:
            s -= slope * tl.abs(offs_m[:, None] - cols[None, :]).to(tl.float32)
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # column 0 is valid for every row, so m_new is finite from the first block on
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    acc = acc / l_i[:, None]
    row_ok = offs_m < S
    o_ptrs = OUT + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.log2(l_i), mask=row_ok)
