"""Fused SwiGLU (kernels.swiglu) under the interpreter against the reference: forward, and the backward
written as one [d gate | d up] tensor."""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 2 * 40), (7, 2 * 21), (2, 2 * 16)])
def test_swiglu_matches_reference(dtype, shape, assert_close):
    x = (torch.randn(shape) * 3).to(dtype)
    dy = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
    a = x.clone().requires_grad_(True)
    y = kernels.swiglu(a)
    (dx,) = torch.autograd.grad(y, (a,), dy)
    b = x.clone().requires_grad_(True)
    y_ref = reference.swiglu(b)
    (dx_ref,) = torch.autograd.grad(y_ref, (b,), dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert dx.is_contiguous() and dx.shape == x.shape


def test_swiglu_saturates_without_nans():
    x = torch.tensor([[-1e4, 50.0, -80.0, 3.0, 2.0, -1.0, 1e4, 0.5]], dtype=torch.float32, requires_grad=True)
    y = kernels.swiglu(x)
    (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    x_ref = x.detach().clone().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(reference.swiglu(x_ref), (x_ref,), torch.ones_like(y))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_swiglu_strided_input():
    # a column slice of a wider tensor: rows have a stride larger than 2F
    wide = torch.randn(6, 50)
    x = wide[:, 3:43]
    torch.testing.assert_close(kernels.swiglu(x), reference.swiglu(x), rtol=1e-6, atol=1e-6)


def test_swiglu_odd_width_is_refused():
    with pytest.raises(ValueError, match=r"even, non-zero last dimension; got shape \(4, 7\)"):
        kernels.swiglu(torch.randn(4, 7))
