"""The LayerNorm/RMSNorm Triton kernels: forward (optionally of x + residual), backward (optionally adding
the residual path's gradient) and the column sum of the backward's partial rows. Launch configuration,
autograd and the public functions are in engine/kernels/norm.py, whose docstring describes the design.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input rows, row stride stride_x, unit column stride
    Y,  # (M, N) output rows in X's dtype, row stride stride_y
    W,  # (N,) weight
    B,  # (N,) bias; not read unless HAS_BIAS
    MEAN,  # (M,) fp32 row means saved for the backward; not written for RMSNorm
    RSTD,  # (M,) fp32 reciprocal standard deviations (RMSNorm: reciprocal root mean square)
    R,  # (M, N) residual added to X first, row stride stride_r; not read unless HAS_RES
    S,  # (M, N) out: X + R in X's dtype (what is normalized), row stride stride_s; only if HAS_RES
    stride_x,
    stride_y,
    stride_r,
    stride_s,
    M,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,  # normalize X + R (rounded to X's dtype, which S holds) instead of X
    BLOCK_M: tl.constexpr,  # rows per program (SINGLE path; 1 otherwise)
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,  # N <= BLOCK_N: one block per row, no chunk loop
):
    if SINGLE:
        # BLOCK_M whole rows in registers: x is read once
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = x.to(S.dtype.element_ty)  # the sum as the unfused add would round it
            tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
        if IS_RMS:
            xc = x  # zero where masked
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(MEAN + rows, mean, mask=row_mask)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        Y += row * stride_y
        if HAS_RES:
            # write the rounded sum once, then normalize it: the loops below read S instead of X
            S += row * stride_s
            R += row * stride_r
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                total = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
                total += tl.load(R + cols, mask=cols < N, other=0.0).to(tl.float32)
                tl.store(S + cols, total.to(S.dtype.element_ty), mask=cols < N)
            tl.debug_barrier()  # the sums are visible to whichever thread reads them back below
            X = S
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
def _load_chunk(x_row, dy_row, W, start, N, BLOCK_N: tl.constexpr):
    """Columns [start, start + BLOCK_N) of one row (chunked backward): (cols, mask, x, dy, w), fp32, 0 past N."""
    cols = start + tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, x, dy, w


@triton.jit
def _norm_bwd_kernel(
    X,  # (M, N) forward input, row stride stride_x
    DY,  # (M, N) upstream gradient, row stride stride_dy
    DX,  # (M, N) output input-gradient in X's dtype, row stride stride_dx
    W,  # (N,) weight
    MEAN,  # (M,) fp32 row means from the forward; not read for RMSNorm
    RSTD,  # (M,) fp32 reciprocal std from the forward
    DW_PART,  # (G, N) fp32, written: row g = sum over program g's rows of dy * xhat
    DB_PART,  # (G, N) fp32, written: row g = sum over program g's rows of dy; only if HAS_BIAS
    DRES,  # (M, N) gradient reaching the normalized input from elsewhere (the residual path), added to dx
    stride_x,
    stride_dy,
    stride_dx,
    stride_dres,
    M,
    N,
    rows_per_program,  # program g handles rows [g * rows_per_program, (g + 1) * rows_per_program) & [0, M)
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,  # DRES is read (the fused residual add's backward)
    BLOCK_M: tl.constexpr,  # rows per tile (SINGLE path; 1 otherwise)
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,  # N <= BLOCK_N: tiles held in registers, dweight/dbias summed there
    STAGES: tl.constexpr,  # software-pipelining depth of the tile loop (SINGLE path)
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DW_PART += pid.to(tl.int64) * N
    DB_PART += pid.to(tl.int64) * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # STAGES > 2 lets the compiler fetch the next tiles' x and dy (into shared memory) while this one is
        # reduced; with STAGES == 2 the copy is issued at the end of an iteration and awaited at the start
        # of the next, so nothing overlaps
        for start in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            # masked rows and columns load 0 (and rstd 0), so they add nothing to the sums below
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            if IS_RMS:
                xhat = x * rstd
            else:
                mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy = w * dy
            # dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)); the last term only for LayerNorm
            if IS_RMS:
                c1 = tl.sum(xhat * wdy, axis=1) / N
                dx = (wdy - xhat * c1[:, None]) * rstd
            else:
                # both row sums in one reduction: one shared-memory exchange (and barrier) instead of two
                s1, s2 = tl.reduce((xhat * wdy, wdy), 1, _add_pair)
                dx = (wdy - xhat * (s1 / N)[:, None] - (s2 / N)[:, None]) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            # sums over the tile's rows: within each thread when the warps all lie along the row (which the
            # launch heuristic arranges), else through shared memory
            if HAS_BIAS:
                dw_rows, db_rows = tl.reduce((dy * xhat, dy), 0, _add_pair)
                dw_acc += dw_rows
                db_acc += db_rows
            else:
                dw_acc += tl.sum(dy * xhat, axis=0)
        tl.store(DW_PART + cols, dw_acc, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_PART + cols, db_acc, mask=col_mask)
    else:
        # this program owns row pid of the partial buffers (uninitialised memory): zero it, then
        # read-add-write it once per row; no other program touches it, so there is no race
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            tl.store(DW_PART + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=cols < N)
            if HAS_BIAS:
                tl.store(DB_PART + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=cols < N)
        tl.debug_barrier()  # the zeros are visible to whichever thread reads them back below
        for row in range(row_start, row_end):
            x_row = X + row * stride_x
            dy_row = DY + row * stride_dy
            dx_row = DX + row * stride_dx
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols, mask, x, dy, w = _load_chunk(x_row, dy_row, W, start, N, BLOCK_N)
                wdy = w * dy  # zero on masked columns, so the sums need no extra masking
                acc1 += (x - mean) * rstd * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols, mask, x, dy, w = _load_chunk(x_row, dy_row, W, start, N, BLOCK_N)
                xhat = (x - mean) * rstd
                if IS_RMS:
                    dx = (w * dy - xhat * c1) * rstd
                else:
                    dx = (w * dy - xhat * c1 - c2) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(DW_PART + cols, mask=mask, other=0.0) + dy * xhat
                tl.store(DW_PART + cols, dw, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB_PART + cols, mask=mask, other=0.0) + dy
                    tl.store(DB_PART + cols, db, mask=mask)


@triton.jit
def _partials_sum_kernel(
    DW_PART,  # (G, N) fp32 partial rows of dweight
    DB_PART,  # (G, N) fp32 partial rows of dbias; not read unless HAS_BIAS
    DW,  # (N,) out: column sums of DW_PART, in DW's dtype
    DB,  # (N,) out: column sums of DB_PART, in DB's dtype; not written unless HAS_BIAS
    G,
    N,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        groups = start + tl.arange(0, BLOCK_G)
        mask = (groups < G)[:, None] & col_mask[None, :]
        offsets = groups.to(tl.int64)[:, None] * N + cols[None, :]
        dw += tl.load(DW_PART + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_PART + offsets, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)
