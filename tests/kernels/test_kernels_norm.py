"""LayerNorm / RMSNorm kernels (forward and backward) against engine.kernels.reference under the interpreter.

Under the interpreter the norm picks 64-wide blocks and 256-element tiles: hidden sizes 100 and 200 (not
powers of two) take the chunked path over 2-4 chunks; 48 and 64 take the tile path with BLOCK_M 4, 16 with
BLOCK_M 16; row counts are chosen so that the last tile of a program (or of the tensor) is partly masked.
"""

from __future__ import annotations

import pytest
import torch
import triton

from engine import kernels
from engine.kernels import norm, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


def _run(fn, args, dy):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


@pytest.fixture
def bwd_configs(monkeypatch):
    """The backward launch configurations used during the test, in launch order."""
    seen = []
    launch = norm._launch_bwd

    def spy(cfg, *args, **kwargs):
        seen.append(cfg)
        return launch(cfg, *args, **kwargs)

    monkeypatch.setattr(norm, "_launch_bwd", spy)
    return seen


def _expect_path(configs, hidden):
    # the path the shape is meant to exercise really ran: tiles of several rows, or the chunk loop
    (cfg,) = configs
    if hidden <= 64:
        assert cfg.single and cfg.block_m == (16 if hidden <= 16 else 4) and cfg.block_n >= hidden, cfg
    else:
        assert not cfg.single and cfg.block_m == 1 and cfg.block_n == 64, cfg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 100), (7, 200), (9, 48), (37, 64), (13, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference(dtype, shape, with_bias, assert_close, bwd_configs):
    hidden = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    b = (0.1 * torch.randn(hidden)).to(dtype)
    dy = torch.randn(shape).to(dtype)
    if with_bias:
        args = (x, w, b)
        fn, ref = (
            (lambda *a: kernels.layer_norm(*a, eps=1e-5)),
            (lambda *a: reference.layer_norm(*a, eps=1e-5)),
        )
    else:
        args = (x, w)
        fn = lambda x_, w_: kernels.layer_norm(x_, w_, None)
        ref = lambda x_, w_: reference.layer_norm(x_, w_, None)
    y, grads = _run(fn, args, dy)
    _expect_path(bwd_configs, hidden)
    y_ref, grads_ref = _run(ref, args, dy)
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(g, g_ref, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 100), (5, 200), (11, 48), (2, 19, 64), (13, 16)])
def test_rms_norm_matches_reference(dtype, shape, assert_close, bwd_configs):
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape).to(dtype)
    y, (dx, dw) = _run(lambda a, b: kernels.rms_norm(a, b, eps=1e-6), (x, w), dy)
    _expect_path(bwd_configs, shape[-1])
    y_ref, (dx_ref, dw_ref) = _run(lambda a, b: reference.rms_norm(a, b, eps=1e-6), (x, w), dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dweight")


def test_tile_configs_under_the_interpreter():
    # the heuristics these tests rely on; whole tiles per program, so only the last tile is partly masked
    assert norm._fwd_config(48) == (4, 64, True, 1)
    assert norm._fwd_config(16) == (16, 16, True, 1)
    assert norm._fwd_config(100) == (1, 64, False, 1)
    cfg = norm._bwd_config(37, 64, CPU)
    assert (cfg.block_m, cfg.block_n, cfg.single, cfg.programs, cfg.rows_per_program) == (4, 64, True, 4, 12)
    cfg = norm._bwd_config(7, 200, CPU)
    assert (cfg.block_m, cfg.block_n, cfg.single, cfg.programs, cfg.rows_per_program) == (1, 64, False, 4, 2)
    assert norm._bwd_config(0, 64, CPU).programs == 1


def _stats(x: torch.Tensor, is_rms: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    if is_rms:
        return torch.zeros(x.shape[0]), torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return xf.mean(-1), torch.rsqrt(xf.var(-1, unbiased=False) + eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_no_bias", "rms_norm"])
@pytest.mark.parametrize(
    "hidden, rows_per_program",
    [(48, 5), (64, 6), (200, 3)],  # tiles of 4 rows: programs end mid-tile (5, 6 rows); 200: chunked
)
def test_backward_kernel_ranges_and_partials(dtype, kind, hidden, rows_per_program, assert_close):
    # the kernel alone, at row ranges the host never picks (not whole tiles), into partial buffers full
    # of NaN: each program must write (not accumulate into) its partial rows
    m, eps, is_rms, has_bias = 23, 1e-5, kind == "rms_norm", kind == "layer_norm"
    x = (torch.randn(m, hidden) + 0.3).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    dy = torch.randn(m, hidden).to(dtype)
    mean, rstd = _stats(x, is_rms, eps)
    cfg = norm._bwd_config(m, hidden, CPU)
    programs = triton.cdiv(m, rows_per_program)
    cfg = cfg._replace(programs=programs, rows_per_program=rows_per_program)
    assert cfg.block_m == (1 if hidden > 64 else 4) and (hidden > 64 or rows_per_program % cfg.block_m)
    dx = torch.full_like(x, float("nan"))
    dw_part = torch.full((programs, hidden), float("nan"))
    db_part = torch.full((programs, hidden), float("nan")) if has_bias else None
    norm._launch_bwd(cfg, x, dy, dx, w, mean, rstd, dw_part, db_part, is_rms)

    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    if is_rms:
        y = reference.rms_norm(*leaves, eps=eps)
    else:
        y = reference.layer_norm(*leaves, None, eps=eps)
    dx_ref, _ = torch.autograd.grad(y, leaves, dy)
    assert_close(dx, dx_ref, dtype, "dx")
    # each partial row: its own program's rows, in fp32
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    for g in range(programs):
        sl = slice(g * rows_per_program, (g + 1) * rows_per_program)
        dyf = dy[sl].float()
        assert_close(dw_part[g], (dyf * xhat[sl]).sum(0), 1e-5, f"dweight partial {g}")
        if has_bias:
            assert_close(db_part[g], dyf.sum(0), 1e-5, f"dbias partial {g}")


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups, hidden", [(11, 37), (1, 16), (4, 5)])
def test_sum_partials(out_dtype, with_bias, groups, hidden, assert_close):
    # column sums in fp32 over interpreter blocks of 4 partial rows x 16 columns, both ragged
    dw_part = torch.randn(groups, hidden) * 3
    db_part = torch.randn(groups, hidden) if with_bias else None
    dw, db = norm._sum_partials(dw_part, db_part, out_dtype, torch.float32 if with_bias else None)
    assert_close(dw, dw_part.double().sum(0).to(out_dtype), out_dtype, "dweight")
    if with_bias:
        assert db.dtype == torch.float32
        assert_close(db, db_part.double().sum(0).float(), 1e-5, "dbias")
    else:
        assert db is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows, hidden", [(8192, 1024), (4099, 2048), (1000, 4096), (517, 8192), (64, 12288)])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norm_cuda_matches_reference(rows, hidden, kind, assert_close):
    # the launch configurations the interpreter never sees: register caps, 3-deep pipelining, real tiles
    x = (torch.randn(rows, hidden, device="cuda") + 0.3).bfloat16()
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16()
    b = (0.1 * torch.randn(hidden, device="cuda")).bfloat16()
    dy = torch.randn_like(x)
    args = (x, w, b) if kind == "layer_norm" else (x, w)
    ours, ref = getattr(kernels, kind), getattr(reference, kind)
    y, grads = _run(ours, args, dy)
    y_ref, grads_ref = _run(ref, args, dy)
    assert_close(y, y_ref, torch.bfloat16, "y")
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(g, g_ref, torch.bfloat16, name)


def test_norm_empty_input():
    x = torch.randn(0, 48, requires_grad=True)
    w = torch.ones(48, requires_grad=True)
    b = torch.zeros(48, requires_grad=True)
    y = kernels.layer_norm(x, w, b)
    assert y.shape == (0, 48)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert dx.shape == (0, 48) and dw.abs().sum() == 0 and db.abs().sum() == 0


def test_norm_statistics_are_fp32_for_large_offsets(assert_close):
    # fp16 rows with a large common offset: fp16 statistics would lose the variance entirely
    x = (1000 + torch.randn(4, 100)).to(torch.float16)
    w = torch.ones(100, dtype=torch.float16)
    y = kernels.layer_norm(x, w, None)
    assert_close(y, reference.layer_norm(x, w, None), torch.float16, "y")
    assert y.float().std(dim=-1).min().item() > 0.9


def test_norm_rejects_weight_of_wrong_size():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"norm weight/bias must have shape \(10,\) to match x's last dimension"):
        kernels.rms_norm(x, torch.ones(9))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 200), (37, 16)])  # tile path, chunked path, tile of 16 rows
@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_nobias", "rms_norm"])
def test_add_norm_matches_reference(dtype, shape, kind, bwd_configs, assert_close):
    # (x + r, norm(x + r)) with both outputs used downstream, as in a pre-norm block: the sum's own gradient
    # and the norm's input gradient meet in one kernel, and x and r get the same gradient
    hidden = shape[-1]
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    b = (0.1 * torch.randn(hidden)).to(dtype)
    dsum, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    if kind == "rms_norm":
        params = (w,)
        fn = lambda x_, r_, w_: kernels.add_rms_norm(x_, r_, w_, eps=1e-6)
        ref = lambda x_, r_, w_: reference.add_rms_norm(x_, r_, w_, eps=1e-6)
    elif kind == "layer_norm":
        params = (w, b)
        fn = lambda x_, r_, w_, b_: kernels.add_layer_norm(x_, r_, w_, b_)
        ref = lambda x_, r_, w_, b_: reference.add_layer_norm(x_, r_, w_, b_)
    else:
        params = (w,)
        fn = lambda x_, r_, w_: kernels.add_layer_norm(x_, r_, w_, None)
        ref = lambda x_, r_, w_: reference.add_layer_norm(x_, r_, w_, None)
    results = []
    for f in (fn, ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, *params)]
        total, y = f(*leaves)
        grads = torch.autograd.grad((total, y), leaves, (dsum, dy))
        results.append((total.detach(), y.detach(), grads))
    (total, y, grads), (total_ref, y_ref, grads_ref) = results
    if dtype == torch.bfloat16:
        # the interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even, as torch does: the
        # gpu-marked test asserts bitwise equality there), so allow one bf16 ulp here
        assert_close(total, total_ref, dtype, "x + residual")
    else:
        assert torch.equal(total, total_ref)  # the sum is rounded to the dtype exactly as the unfused add
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_ref):
        assert_close(g, g_ref, dtype, name)
    assert torch.equal(grads[0], grads[1])
    assert bwd_configs  # the Triton backward ran


def test_add_norm_unused_normalized_output_passes_the_gradient_through():
    x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.ones(32)
    xl, rl = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    total, _ = kernels.add_rms_norm(xl, rl, w)
    dsum = torch.randn(4, 32)
    dx, dr = torch.autograd.grad(total, (xl, rl), dsum)
    assert torch.equal(dx, dsum) and torch.equal(dr, dsum)


def test_add_norm_residual_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"residual \(4, 8\) torch.float32 must match x \(4, 16\) torch.float32"):
        kernels.add_layer_norm(torch.randn(4, 16), torch.randn(4, 8), torch.ones(16), None)
