"""Fused bias + tanh-GELU kernels (forward, dh and dbias) against engine.kernels.reference under the interpreter.

The interpreter's tiles are 4 rows x up to 32 columns and the backward splits rows into up to 3 groups, so
hidden sizes 48/100 span 2-4 column blocks (the last partial) and the row counts below leave a partial
last tile, several tiles per program and several partial rows of the bias gradient.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.gelu import bias_gelu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, h, bias, dy):
    h, bias = (t.detach().clone().requires_grad_(True) for t in (h, bias))
    y = fn(h, bias)
    dh, db = torch.autograd.grad(y, (h, bias), dy)
    return y.detach(), dh, db


def _check(h, bias, dy, tol, assert_close):
    y, dh, db = _run(bias_gelu, h, bias, dy)
    y_ref, dh_ref, db_ref = _run(reference.bias_gelu, h, bias, dy)
    assert_close(y, y_ref, tol, "y")
    assert_close(dh, dh_ref, tol, "dh")
    assert_close(db, db_ref, tol, "dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 100), (2, 7, 48), (1, 33)])
def test_bias_gelu_matches_reference(dtype, shape, assert_close):
    h = torch.randn(shape).to(dtype)
    bias = (0.5 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape).to(dtype)
    _check(h, bias, dy, dtype, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_is_stable_for_large_inputs(dtype, assert_close):
    # |h + bias| up to ~21: the tanh saturates; exp(-z) overflowing to inf must give 0, not nan
    h = (torch.rand(6, 40) * 40 - 20).to(dtype)
    h[0, :4] = torch.tensor([-20.0, 20.0, -1e4, 1e4]).to(dtype)
    bias = torch.randn(40).to(dtype)
    dy = torch.randn(6, 40).to(dtype)
    y, dh, db = _run(bias_gelu, h, bias, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dh).all() and torch.isfinite(db).all()
    _check(h, bias, dy, dtype, assert_close)


def test_bias_gelu_mixed_dtypes_and_strided_rows(assert_close):
    # bf16 activations with an fp32 bias (a master-weight bias under autocast); h a column slice of a
    # wider buffer (row stride 64, not 40); dy not contiguous (a transposed copy)
    h = torch.randn(9, 64).to(torch.bfloat16)[:, :40]
    bias = 0.5 * torch.randn(40)
    dy = torch.randn(40, 9).to(torch.bfloat16).t()
    y, dh, db = _run(bias_gelu, h, bias, dy)
    assert y.dtype == dh.dtype == torch.bfloat16 and db.dtype == torch.float32
    _check(h, bias, dy, torch.bfloat16, assert_close)


def test_bias_gelu_dbias_is_fp32_sum_and_deterministic(assert_close):
    # many rows of bf16: dbias summed in fp32 from unrounded dh, identical across runs
    h = torch.randn(37, 24).to(torch.bfloat16)
    bias = torch.randn(24).to(torch.bfloat16)
    dy = torch.randn(37, 24).to(torch.bfloat16)
    _, dh1, db1 = _run(bias_gelu, h, bias, dy)
    _, dh2, db2 = _run(bias_gelu, h, bias, dy)
    assert torch.equal(dh1, dh2) and torch.equal(db1, db2)
    x = h.float() + bias.float()
    x.requires_grad_(True)
    (dh_f32,) = torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh"), x, dy.float())
    assert_close(db1, dh_f32.sum(0).to(torch.bfloat16), torch.bfloat16, "dbias")


def test_bias_gelu_without_bias_grad(assert_close):
    h = torch.randn(5, 50, requires_grad=True)
    bias = torch.randn(50)
    (dh,) = torch.autograd.grad(bias_gelu(h, bias), h, torch.ones(5, 50))
    (dh_ref,) = torch.autograd.grad(reference.bias_gelu(h, bias), h, torch.ones(5, 50))
    assert_close(dh, dh_ref, 1e-5, "dh")


def test_bias_gelu_rejects_bias_of_wrong_shape():
    with pytest.raises(
        ValueError,
        match=r"bias must have shape \(10,\) to match h's last dimension, got bias "
        r"\(9,\) for h \(2, 3, 10\)",
    ):
        bias_gelu(torch.randn(2, 3, 10), torch.randn(9))
    with pytest.raises(ValueError, match=r"got bias \(1, 10\) for h \(4, 10\)"):
        bias_gelu(torch.randn(4, 10), torch.randn(1, 10))
