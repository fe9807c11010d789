"""FlashAttention-2 kernels (forward and backward) against the explicit-softmax reference.

Sequences of 17-33 positions span several of the interpreter's 16-wide tiles, so masking of the ragged
last tile and causal block skipping are exercised; head dims 24 and 40 take the padded path.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference


def _run(fn, q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def _check(batch, heads, kv_heads, seq, dim, dtype, assert_close, **kw):
    q = torch.randn(batch, heads, seq, dim).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim).to(dtype)
    v = torch.randn(batch, kv_heads, seq, dim).to(dtype)
    dout = torch.randn(batch, heads, seq, dim).to(dtype)
    out, grads = _run(kernels.attention, q, k, v, dout, **kw)
    out_ref, grads_ref = _run(reference.attention, q, k, v, dout, **kw)
    assert_close(out, out_ref, dtype, "out")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(g, g_ref, dtype, name)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "shape",
    [(1, 2, 2, 33, 64), (2, 4, 2, 19, 24), (1, 3, 1, 17, 128)],
    ids=["mha-d64", "gqa-d24", "mqa-d128"],
)
def test_attention_fp32_matches_reference(shape, causal, assert_close):
    _check(*shape, torch.float32, assert_close, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_alibi_gqa_matches_reference(causal, assert_close):
    slopes = torch.rand(4) * 0.5
    _check(1, 4, 2, 21, 40, torch.float32, assert_close, causal=causal, alibi_slopes=slopes)


def test_attention_custom_scale_matches_reference(assert_close):
    _check(1, 2, 2, 18, 32, torch.float32, assert_close, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision_matches_reference(dtype, assert_close):
    _check(1, 2, 1, 20, 64, dtype, assert_close, causal=True)


def test_attention_causal_ignores_future_keys():
    # changing the last key/value must leave every earlier output row bit-identical
    q, k, v = (torch.randn(1, 2, 19, 32) for _ in range(3))
    out = kernels.attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 3.0
    out2 = kernels.attention(q, k2, v2, causal=True)
    assert torch.equal(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.equal(out[:, :, -1], out2[:, :, -1])


def test_attention_rejects_heads_not_divisible_by_kv_heads():
    q, kv = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of kv heads \(2\)"):
        kernels.attention(q, kv, kv)
