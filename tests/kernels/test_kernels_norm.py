"""LayerNorm / RMSNorm kernels (forward and backward) against kernels.reference under the interpreter.

Hidden sizes 100 and 200 are not powers of two and span 2-4 of the interpreter's 64-wide chunks.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, args, dy):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 100), (7, 200), (9, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference(dtype, shape, with_bias, assert_close):
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
    y_ref, grads_ref = _run(ref, args, dy)
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_close(g, g_ref, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 100), (5, 200), (11, 48)])
def test_rms_norm_matches_reference(dtype, shape, assert_close):
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape).to(dtype)
    y, (dx, dw) = _run(lambda a, b: kernels.rms_norm(a, b, eps=1e-6), (x, w), dy)
    y_ref, (dx_ref, dw_ref) = _run(lambda a, b: reference.rms_norm(a, b, eps=1e-6), (x, w), dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dweight")


def test_norm_statistics_are_fp32_for_large_offsets(assert_close):
    # fp16 rows with a large common offset: fp16 statistics would lose the variance entirely
    x = (1000 + torch.randn(4, 100)).to(torch.float16)
    w = torch.ones(100, dtype=torch.float16)
    y = kernels.layer_norm(x, w, None)
    assert_close(y, reference.layer_norm(x, w, None), torch.float16, "y")
    assert y.float().std(dim=-1).min().item() > 0.9


def test_norm_rejects_weight_of_wrong_size():
    x = torch.randn(2, 10)
    with pytest.raises(
        ValueError, match=r"norm weight/bias must have shape \(10,\) to match x's last dimension"
    ):
        kernels.rms_norm(x, torch.ones(9))
