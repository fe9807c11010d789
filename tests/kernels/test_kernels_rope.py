"""Rotary embedding on the packed qkv projection (kernels.rope_packed) under the interpreter: against the
reference, against the model's apply_rope on split q/k (the same convention), backward as the inverse."""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import reference
from engine.model.positions import apply_rope, rope_tables


def _qkv(seq, batch, n_heads, kv_heads, dim, dtype):
    return torch.randn(seq, batch, (n_heads + 2 * kv_heads) * dim).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, batch, n_heads, kv_heads, dim", [(7, 3, 4, 2, 16), (5, 2, 2, 2, 12), (9, 1, 3, 1, 8)])
def test_rope_packed_matches_reference(dtype, seq, batch, n_heads, kv_heads, dim, assert_close):
    cos, sin = rope_tables(seq + 3, dim, theta=10000.0)  # longer tables than the sequence
    qkv = _qkv(seq, batch, n_heads, kv_heads, dim, dtype)
    dy = torch.randn_like(qkv)
    x = qkv.clone().requires_grad_(True)
    y = kernels.rope_packed(x, cos, sin, n_heads, kv_heads)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    x_ref = qkv.clone().requires_grad_(True)
    y_ref = reference.rope_packed(x_ref, cos, sin, n_heads, kv_heads)
    (dx_ref,) = torch.autograd.grad(y_ref, (x_ref,), dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dqkv")
    # value heads pass through untouched, in both directions
    v0 = (n_heads + kv_heads) * dim
    assert torch.equal(y[..., v0:], qkv[..., v0:])
    assert torch.equal(dx[..., v0:], dy[..., v0:])


def test_rope_packed_is_the_models_rotation():
    # the same convention as the split path: apply_rope on (B, h, S, hd) views of q and k
    seq, batch, n_heads, kv_heads, dim = 6, 2, 4, 2, 16
    cos, sin = rope_tables(seq, dim, theta=500.0)
    qkv = _qkv(seq, batch, n_heads, kv_heads, dim, torch.float32)
    y = kernels.rope_packed(qkv, cos, sin, n_heads, kv_heads)
    heads = qkv.unflatten(-1, (n_heads + 2 * kv_heads, dim)).permute(1, 2, 0, 3)
    out = y.unflatten(-1, (n_heads + 2 * kv_heads, dim)).permute(1, 2, 0, 3)
    torch.testing.assert_close(out[:, :n_heads], apply_rope(heads[:, :n_heads], cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        out[:, n_heads : n_heads + kv_heads],
        apply_rope(heads[:, n_heads : n_heads + kv_heads], cos, sin),
        rtol=1e-6,
        atol=1e-6,
    )


def test_rope_packed_backward_is_the_inverse_rotation():
    seq, batch, n_heads, kv_heads, dim = 5, 2, 2, 1, 8
    cos, sin = rope_tables(seq, dim, theta=10000.0)
    qkv = _qkv(seq, batch, n_heads, kv_heads, dim, torch.float32).requires_grad_(True)
    y = kernels.rope_packed(qkv, cos, sin, n_heads, kv_heads)
    (back,) = torch.autograd.grad(y, (qkv,), y.detach())  # R^T R x = x
    torch.testing.assert_close(back, qkv.detach(), rtol=1e-6, atol=1e-6)


def test_rope_packed_errors():
    cos, sin = rope_tables(4, 8, theta=10000.0)
    with pytest.raises(ValueError, match=r"not n_heads \+ 2 \* kv_heads = 4 heads of an even head_dim"):
        kernels.rope_packed(torch.randn(4, 1, 30), cos, sin, 2, 1)
    with pytest.raises(ValueError, match=r"cos/sin must be \(>= 6, 4\), got \(4, 4\) and \(4, 4\)"):
        kernels.rope_packed(torch.randn(6, 1, 32), cos, sin, 2, 1)
