"""FlashAttention-2 backward kernels: recompute the probabilities from the saved log2-sum-exp.

1. ``attn_bwd_preprocess_kernel``: delta = rowsum(dO * O), fp32 (B, H, S).
2. ``attn_bwd_dkdv_kernel``: one program per (BLOCK_N keys, batch*kv_head) walks the query blocks of
   every query head in its GQA group (so dK/dV of shared kv heads are summed in registers, no atomics);
   causal programs start at their diagonal block.
3. ``attn_bwd_dq_kernel``: one program per (BLOCK_M queries, batch*head) walks the key blocks, causal
   programs stopping at the diagonal.
With s = scale * q.k (+ bias), p = softmax(s): dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q,
dV = P^T dO, dP = dO V^T.
Every (B, H, S, D) operand (Q, K, V, O, dO, dQ, dK, dV) is addressed through its own (b, h, s) strides
with unit stride along D, so views into a packed (S, B, heads, D) buffer are read and written in place;
LSE and DELTA are contiguous fp32 (B, H, S).
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.attention_fwd import mma


def bwd_configs() -> list[triton.Config]:
    # CUDA only; the interpreter bypasses the autotuner
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 32, 4, 3)]
    ]


@triton.jit
def attn_bwd_preprocess_kernel(
    OUT,  # (B, H, S, D) forward output, unit stride along D
    DO,  # (B, H, S, D) upstream gradient, unit stride along D
    DELTA,  # (B, H, S) fp32 out, contiguous: rowsum(dO * O)
    stride_ob,
    stride_oh,
    stride_os,
    stride_dob,
    stride_doh,
    stride_dos,
    H,
    S,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < S) & (offs_d[None, :] < D)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * S + rows, tl.sum(o * do, axis=1), mask=rows < S)


@triton.autotune(configs=bwd_configs(), key=["S", "BLOCK_D", "CAUSAL", "HAS_ALIBI"])
@triton.jit
def attn_bwd_dkdv_kernel(
    Q,  # (B, H, S, D) queries, unit stride along D
    K,  # (B, HKV, S, D) keys, unit stride along D
    V,  # (B, HKV, S, D) values, unit stride along D
    DO,  # (B, H, S, D) upstream gradient, unit stride along D
    LSE,  # (B, H, S) fp32 log2-sum-exp from the forward, contiguous
    DELTA,  # (B, H, S) fp32 rowsum(dO * O), contiguous
    DK,  # (B, HKV, S, D) out: key gradient in K's dtype, unit stride along D
    DV,  # (B, HKV, S, D) out: value gradient in V's dtype, unit stride along D
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
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    H,
    HKV,
    GROUP,
    S,
    D,
    sm_scale,
    qk_scale,  # sm_scale * log2(e)
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (cols[:, None] < S) & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # query blocks above the diagonal see none of these keys
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for start_m in range(lo, S, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < S
            q = tl.load(
                q_base + rows[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_D)
            do = tl.load(
                do_base + rows[:, None] * stride_dos + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            lse = tl.load(LSE + bh * S + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * S + rows, mask=row_ok, other=0.0)
            s_t = mma(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
            if HAS_ALIBI:
                s_t -= slope * tl.abs(rows[None, :] - cols[:, None]).to(tl.float32)
            valid = row_ok[None, :] & (cols[:, None] < S)
            if CAUSAL:
                valid = valid & (cols[:, None] <= rows[None, :])
            p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += mma(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST_DOT)
            dp_t = mma(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += mma(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST_DOT)
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=bwd_configs(), key=["S", "BLOCK_D", "CAUSAL", "HAS_ALIBI"])
@triton.jit
def attn_bwd_dq_kernel(
    Q,  # (B, H, S, D) queries, unit stride along D
    K,  # (B, HKV, S, D) keys, unit stride along D
    V,  # (B, HKV, S, D) values, unit stride along D
    DO,  # (B, H, S, D) upstream gradient, unit stride along D
    LSE,  # (B, H, S) fp32 log2-sum-exp from the forward, contiguous
    DELTA,  # (B, H, S) fp32 rowsum(dO * O), contiguous
    DQ,  # (B, H, S, D) out: query gradient in Q's dtype, unit stride along D
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
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dqb,
    stride_dqh,
    stride_dqs,
    H,
    GROUP,
    S,
    D,
    sm_scale,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = rows < S
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    lse = tl.load(LSE + bh * S + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * S + rows, mask=row_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, S)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_ALIBI:
            s -= slope * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32)
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
