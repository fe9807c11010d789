"""Fused LayerNorm and RMSNorm (forward and backward) over the last dimension.

Statistics are fp32 whatever the input dtype.

The kernels are in engine/kernels/norm_kernels.py; this module picks their launch configuration and wraps them.

Rows of up to ``max_block_n`` (8192) elements take the SINGLE path: whole rows in registers, processed as 2-D
tiles of BLOCK_M rows x BLOCK_N columns, so that one program's loads, row reductions (and their barriers)
and stores cover several rows at once. Rows past the end of a program's range or of the tensor are masked,
so neither M nor the rows per program need be a multiple of BLOCK_M.

* Forward: one tile per program, ``cdiv(M, BLOCK_M)`` programs, BLOCK_M * BLOCK_N ~ ``fwd_tile`` (so BLOCK_M > 1
  only for rows shorter than 4096), one warp per 512 tile elements.
* Backward: a fixed grid of programs, each walking a contiguous range of rows one tile per iteration. It
  sums dweight (and dbias) over its rows in fp32 registers and writes them once, as its own row of a (G, N)
  fp32 partial buffer (written, not accumulated into: no memset). The launch heuristic (``_bwd_config``):
  all of a program's warps lie along the row (at most ``bwd_max_warps``, BLOCK_N / 256 of them; 16 for rows of
  8192), so the per-tile sums over the tile's rows stay within each thread; BLOCK_M then gives each thread
  ``bwd_elems_per_thread`` (16) tile elements, which with the fp32 temporaries is ~110-128 registers; and the
  grid is as many programs per SM as fit the register file at ``bwd_regs`` (128) registers per thread, with
  ptxas capped there (maxnreg) so that they are all resident at once. For bf16 on an H100 that is: hidden
  1024: BLOCK_M 2, 4 warps, 4 programs/SM; 2048: 2, 8, 2; 4096: 1, 8, 2; 8192: 1, 16, 1. The tile loop is
  software-pipelined 3 deep, which keeps the next tile's x and dy loads in flight while a tile is reduced.
  These are reasoned from the compiled code (registers, spills, barriers per iteration, checked by
  tests/kernels/test_kernels_compile.py), not yet measured: tools/gpu_norm_sweep.py sweeps the knobs.

Longer rows take the chunked path, walked in BLOCK_N chunks: one row per program in the forward; one row per
iteration in the backward, whose program zeroes its partial row first and read-add-writes it per row.

A second small kernel sums the G partial rows column-wise in fp32 and writes dweight and dbias in the
parameters' dtypes, in one launch: no atomics, no locks, deterministic.

No autotuner (its repeated benchmark launches would run a configuration per call): the block shapes follow
the row length and the knobs of a ``NormLaunch`` (``launch=`` of the public functions; the defaults unless a
caller such as tools/gpu_norm_sweep.py passes another).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton

from engine.kernels import reference
from engine.kernels.dispatch import interpreting, launchable, use_triton
from engine.kernels.norm_kernels import _norm_bwd_kernel, _norm_fwd_kernel, _partials_sum_kernel


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()
    ).multi_processor_count


@dataclass(frozen=True)
class NormLaunch:
    """The GPU launch knobs of the norm kernels. The defaults are what every caller gets; pass another
    instance as ``launch=`` to the public functions (tools/gpu_norm_sweep.py sweeps them on a GPU)."""

    # rows of up to this many elements take the SINGLE path (whole rows in registers)
    max_block_n: int = 8192
    max_block_m: int = 16
    # forward: BLOCK_M rows per program so that a tile holds ~fwd_tile elements, one warp per fwd_elems_per_warp
    # of them (16 per thread, as with one row of 4096 on 8 warps); rows of 4096 and more: one row per program
    fwd_tile: int = 4096
    fwd_elems_per_warp: int = 512
    # backward: a program has min(bwd_max_warps, BLOCK_N / 256) warps, so that all of them lie along the row (a
    # warp covers 32 lanes x one 16-byte vector, 256 bf16 elements) and the per-tile sums of dweight/dbias over
    # the tile's rows stay within each thread; rows too long for that many warps get up to 16. BLOCK_M is then
    # what gives each thread bwd_elems_per_thread elements of the tile. With the fp32 temporaries that is
    # ~110-128 registers per thread (tests/kernels/test_kernels_compile.py checks that ptxas does not spill at
    # bwd_regs).
    bwd_elems_per_thread: int = 16
    bwd_max_warps: int = 8
    bwd_warps: int | None = None  # overrides the warps above
    bwd_regs: int = 128
    # backward programs (and fp32 partial rows) per SM. None: as many as fit the register file at bwd_regs
    # registers per thread (65536 / (bwd_regs x threads), at most 8). ptxas is capped (maxnreg) so that this
    # many programs are resident on an SM at once: a second wave would leave the SMs half empty most of the time.
    partials_per_sm: int | None = None
    # software-pipelining depth of the backward's tile loop: 3 keeps one tile's loads in flight while the
    # previous one is reduced (Triton 3.9 issues and awaits the only copy back to back at depth 2)
    bwd_stages: int = 3
    # the partial-row reduction: reduce_block_g partial rows x reduce_block_n columns per step, one program per
    # reduce_block_n columns
    reduce_block_g: int = 128
    reduce_block_n: int = 16
    reduce_warps: int = 4


DEFAULT_LAUNCH = NormLaunch()
# under the interpreter: small blocks, so that tiny test shapes walk the chunk loop (rows longer than 64)
# and tiles of several rows (INTERPRET_TILE / BLOCK_N rows: 4 for rows of 33-64, 16 for rows of 16 or less)
INTERPRET_MAX_BLOCK_N = 64
INTERPRET_TILE = 256
REGISTERS_PER_SM = 65536


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def _block_n(n: int, interp: bool, launch: NormLaunch) -> tuple[int, bool]:
    """(BLOCK_N, SINGLE) for rows of length n."""
    block_n = min(triton.next_power_of_2(n), INTERPRET_MAX_BLOCK_N if interp else launch.max_block_n)
    return block_n, n <= block_n


def _rows_per_tile(tile: int, block_n: int, launch: NormLaunch) -> int:
    return min(_pow2_floor(tile // block_n), launch.max_block_m)


def _fwd_config(n: int, launch: NormLaunch = DEFAULT_LAUNCH) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE, num_warps) of the forward."""
    interp = interpreting()
    block_n, single = _block_n(n, interp, launch)
    per_warp = launch.fwd_elems_per_warp
    if not single:
        return 1, block_n, False, 1 if interp else min(max(block_n // per_warp, 1), 16)
    block_m = _rows_per_tile(INTERPRET_TILE if interp else launch.fwd_tile, block_n, launch)
    return block_m, block_n, True, 1 if interp else min(max(block_m * block_n // per_warp, 1), 16)


class _BwdConfig(NamedTuple):
    block_m: int
    block_n: int
    single: bool
    num_warps: int
    programs: int  # also the number of fp32 partial rows
    rows_per_program: int  # a multiple of block_m
    stages: int
    maxnreg: int | None  # ptxas register cap per thread (None under the interpreter)


def _bwd_config(m: int, n: int, device: torch.device, launch: NormLaunch = DEFAULT_LAUNCH) -> _BwdConfig:
    """The backward's launch configuration for m rows of length n."""
    if interpreting():
        block_n, single = _block_n(n, True, launch)
        block_m = _rows_per_tile(INTERPRET_TILE, block_n, launch) if single else 1
        warps, stages, maxnreg, target = 1, 1, None, 4
    else:
        block_n, single = _block_n(n, False, launch)
        along_row = min(max(block_n // 256, 1), launch.bwd_max_warps)
        warps = launch.bwd_warps or min(max(along_row, block_n // (32 * launch.bwd_elems_per_thread)), 16)
        block_m = _rows_per_tile(launch.bwd_elems_per_thread * 32 * warps, block_n, launch) if single else 1
        threads = 32 * warps
        per_sm = launch.partials_per_sm or min(max(REGISTERS_PER_SM // (launch.bwd_regs * threads), 1), 8)
        maxnreg = min(REGISTERS_PER_SM // (per_sm * threads) // 8 * 8, 255)
        stages = launch.bwd_stages
        target = per_sm * _sm_count(device.index) if device.type == "cuda" else 4
    # whole tiles per program, so that only the last program's last tile is partly masked
    programs = max(1, min(target, triton.cdiv(m, block_m)))
    per = max(triton.cdiv(triton.cdiv(m, programs), block_m), 1) * block_m
    return _BwdConfig(block_m, block_n, single, warps, max(triton.cdiv(m, per), 1), per, stages, maxnreg)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., N) -> (M, N) with unit column stride
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_bwd(
    cfg: _BwdConfig,
    x2: torch.Tensor,
    dy2: torch.Tensor,
    dx: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dw_part: torch.Tensor,
    db_part: torch.Tensor | None,
    is_rms: bool,
    dres: torch.Tensor | None = None,
) -> Any:
    """dx, and the (cfg.programs, N) fp32 partial rows of dweight (and dbias when db_part is given).

    Returns what the launch returns (on a GPU the compiled kernel, whose n_regs/n_spills the sweep prints).
    """
    kernel, _ = launchable(_norm_bwd_kernel)
    return kernel[(cfg.programs,)](
        x2,
        dy2,
        dx,
        weight,
        mean,
        rstd,
        dw_part,
        db_part if db_part is not None else dw_part,
        dres if dres is not None else dx,
        x2.stride(0),
        dy2.stride(0),
        dx.stride(0),
        dres.stride(0) if dres is not None else 0,
        x2.shape[0],
        x2.shape[1],
        cfg.rows_per_program,
        IS_RMS=is_rms,
        HAS_BIAS=db_part is not None,
        HAS_DRES=dres is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SINGLE=cfg.single,
        STAGES=cfg.stages,
        num_warps=cfg.num_warps,
        maxnreg=cfg.maxnreg,
    )


def _sum_partials(
    dw_part: torch.Tensor,
    db_part: torch.Tensor | None,
    w_dtype: torch.dtype,
    b_dtype: torch.dtype | None,
    launch: NormLaunch = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Column sums of the (G, N) fp32 partial rows, in the parameters' dtypes (one launch for both)."""
    g, n = dw_part.shape
    dw = torch.empty(n, dtype=w_dtype, device=dw_part.device)
    db = torch.empty(n, dtype=b_dtype, device=dw_part.device) if db_part is not None else None
    if interpreting():
        block_g, block_n, warps = 4, 16, 1
    else:
        block_g, block_n, warps = launch.reduce_block_g, launch.reduce_block_n, launch.reduce_warps
    kernel, _ = launchable(_partials_sum_kernel)
    kernel[(triton.cdiv(n, block_n),)](
        dw_part,
        db_part if db_part is not None else dw_part,
        dw,
        db if db is not None else dw,
        g,
        n,
        HAS_BIAS=db_part is not None,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return dw, db


def _forward(
    x2: torch.Tensor,
    residual2: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    launch: NormLaunch,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(y, x2 + residual2 or None, mean, rstd) for (M, N) rows; the norm is of the sum when a residual is given."""
    m, n = x2.shape
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    total = torch.empty((m, n), dtype=x2.dtype, device=x2.device) if residual2 is not None else None
    mean = torch.empty(m, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    block_m, block_n, single, warps = _fwd_config(n, launch)
    if m:
        kernel, _ = launchable(_norm_fwd_kernel)
        kernel[(triton.cdiv(m, block_m),)](
            x2,
            y,
            weight,
            bias if bias is not None else weight,
            mean,
            rstd,
            residual2 if residual2 is not None else x2,
            total if total is not None else y,
            x2.stride(0),
            y.stride(0),
            residual2.stride(0) if residual2 is not None else 0,
            total.stride(0) if total is not None else 0,
            m,
            n,
            eps,
            IS_RMS=is_rms,
            HAS_BIAS=bias is not None,
            HAS_RES=residual2 is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            SINGLE=single,
            num_warps=warps,
        )
    return y, total, mean, rstd


def _backward(ctx, dy: torch.Tensor, dres: torch.Tensor | None):
    """(dx, dweight, dbias) of the norm of the saved rows, dx + dres when a residual gradient is given."""
    x2, weight, mean, rstd = ctx.saved_tensors
    m, n = x2.shape
    dy2 = _rows(dy)
    dx = torch.empty_like(x2)
    has_bias = ctx.bias_dtype is not None
    cfg = _bwd_config(m, n, x2.device, ctx.launch)
    # every program writes its whole partial row(s): no zero-fill needed
    dw_part = torch.empty((cfg.programs, n), dtype=torch.float32, device=x2.device)
    db_part = torch.empty((cfg.programs, n), dtype=torch.float32, device=x2.device) if has_bias else None
    _launch_bwd(
        cfg,
        x2,
        dy2,
        dx,
        weight,
        mean,
        rstd,
        dw_part,
        db_part,
        ctx.is_rms,
        dres=_rows(dres) if dres is not None else None,
    )
    dw, db = _sum_partials(dw_part, db_part, weight.dtype, ctx.bias_dtype, ctx.launch)
    return dx.view(ctx.shape), dw, db


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool, launch: NormLaunch):
        weight = weight.contiguous()
        bias_c = bias.contiguous() if bias is not None else None
        x2 = _rows(x)
        y, _, mean, rstd = _forward(x2, None, weight, bias_c, eps, is_rms, launch)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype, ctx.is_rms, ctx.shape = bias.dtype if bias is not None else None, is_rms, x.shape
        ctx.launch = launch
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        dx, dw, db = _backward(ctx, dy, None)
        return dx, dw, db, None, None, None


class _AddNormFunction(torch.autograd.Function):
    """(x + residual, norm(x + residual)): the residual stream's add fused into the norm that reads it.

    Backward: the sum's gradient from its other uses (``dsum``) is added to the norm's input gradient in the
    same kernel, and that one tensor is the gradient of both x and residual (no separate accumulation)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, is_rms: bool, launch: NormLaunch):
        weight = weight.contiguous()
        bias_c = bias.contiguous() if bias is not None else None
        y, total, mean, rstd = _forward(_rows(x), _rows(residual), weight, bias_c, eps, is_rms, launch)
        ctx.save_for_backward(total, weight, mean, rstd)
        ctx.bias_dtype, ctx.is_rms, ctx.shape = bias.dtype if bias is not None else None, is_rms, x.shape
        ctx.launch = launch
        return total.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, dsum, dy):
        if dy is None:  # the normalized output was not used: the sum's gradient passes straight through
            return dsum, dsum, None, None, None, None, None
        dx, dw, db = _backward(ctx, dy, dsum)
        return dx, dx, dw, db, None, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"norm weight/bias must have shape ({n},) to match x's last dimension, got "
            f"{tuple(weight.shape)}" + ("" if bias is None else f" and {tuple(bias.shape)}")
        )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    launch: NormLaunch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., H) with fp32 statistics; returns x's dtype."""
    _check(x, weight, bias)
    if not use_triton(x, weight):
        return reference.layer_norm(x, weight, bias, eps)
    return _NormFunction.apply(x, weight, bias, eps, False, launch)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, launch: NormLaunch = DEFAULT_LAUNCH
) -> torch.Tensor:
    """RMSNorm over the last dimension of x (..., H) with fp32 statistics; returns x's dtype."""
    _check(x, weight, None)
    if not use_triton(x, weight):
        return reference.rms_norm(x, weight, eps)
    return _NormFunction.apply(x, weight, None, eps, True, launch)


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    launch: NormLaunch = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s)) with s = x + residual (in x's dtype): a pre-norm block's residual add and the next
    norm in one pass; its backward adds s's own gradient into the norm's, in the same kernel."""
    _check(x, weight, bias)
    _check_residual(x, residual)
    if not use_triton(x, residual, weight):
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    return _AddNormFunction.apply(x, residual, weight, bias, eps, False, launch)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    launch: NormLaunch = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + residual (in x's dtype); see add_layer_norm."""
    _check(x, weight, None)
    _check_residual(x, residual)
    if not use_triton(x, residual, weight):
        return reference.add_rms_norm(x, residual, weight, eps)
    return _AddNormFunction.apply(x, residual, weight, None, eps, True, launch)
