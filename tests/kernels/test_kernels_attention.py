"""FlashAttention-2 kernels (forward and backward) against the explicit-softmax reference.

Sequences of 17-33 positions span several of the interpreter's 16-wide tiles, so masking of the ragged
last tile and causal block skipping are exercised; head dims 24 and 40 take the padded path.
``attention_packed`` is checked against the reference run on the split/permuted (B, heads, S, D) tensors,
exactly as the model splits its qkv projection.
"""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import reference
from engine.kernels.flash_attention import attention_packed


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


def test_attention_noncontiguous_dout_and_strided_inputs_match_reference(assert_close):
    # q/k/v as the model passes them (permuted views of one qkv projection) and dout a permuted view:
    # the kernels read every operand through its strides, with no .contiguous() copy
    seq, batch, heads, kv_heads, dim = 23, 2, 4, 2, 16
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim)
    q, k, v = _split(qkv, heads, kv_heads)
    dout = torch.randn(seq, batch, heads, dim).permute(1, 2, 0, 3)  # (B, H, S, D), not contiguous
    assert not dout.is_contiguous() and not q.is_contiguous()
    out, grads = _run(kernels.attention, q, k, v, dout, causal=True)
    out_ref, grads_ref = _run(reference.attention, q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous())
    assert_close(out, out_ref, torch.float32, "out")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(g, g_ref, torch.float32, name)


# ---- attention_packed: qkv (S, B, (H + 2 Hkv) * D) -> (S, B, H * D) ----


def _split(qkv, heads, kv_heads):
    """What the model does to its qkv projection: split, then (S, B, n, D) -> (B, n, S, D) views."""
    seq, batch, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    parts = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    return tuple(t.reshape(seq, batch, -1, dim).permute(1, 2, 0, 3) for t in parts)


def _packed_reference(qkv, heads, kv_heads, **kw):
    q, k, v = _split(qkv, heads, kv_heads)
    out = reference.attention(q, k, v, **kw)  # (B, H, S, D)
    return out.permute(2, 0, 1, 3).reshape(qkv.shape[0], qkv.shape[1], -1)


def _run_packed(fn, qkv, heads, kv_heads, dout, **kw):
    leaf = qkv.detach().clone().requires_grad_(True)
    out = fn(leaf, heads, kv_heads, **kw)
    (grad,) = torch.autograd.grad(out, leaf, dout)
    return out.detach(), grad


def _check_packed(seq, batch, heads, kv_heads, dim, dtype, assert_close, *, alibi=False, **kw):
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim).to(dtype)
    dout = torch.randn(seq, batch, heads * dim).to(dtype)
    if alibi:
        kw["alibi_slopes"] = torch.rand(heads) * 0.5
    out, dqkv = _run_packed(attention_packed, qkv, heads, kv_heads, dout, **kw)
    out_ref, dqkv_ref = _run_packed(_packed_reference, qkv, heads, kv_heads, dout, **kw)
    assert_close(out, out_ref, dtype, "out")
    assert_close(dqkv, dqkv_ref, dtype, "dqkv")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "shape, alibi",
    [((37, 2, 2, 2, 16), False), ((19, 1, 4, 2, 24), False), ((21, 1, 4, 2, 40), True), ((17, 2, 3, 1, 32), True)],
    ids=["mha-s37-d16", "gqa-d24", "gqa-alibi-d40", "mqa-alibi-d32"],
)
def test_attention_packed_fp32_matches_reference(shape, alibi, causal, assert_close):
    _check_packed(*shape, torch.float32, assert_close, alibi=alibi, causal=causal)


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_attention_packed_bf16_matches_reference(alibi, assert_close):
    _check_packed(37, 1, 4, 2, 32, torch.bfloat16, assert_close, alibi=alibi, causal=True)


def test_attention_packed_custom_scale_matches_reference(assert_close):
    _check_packed(18, 1, 2, 1, 16, torch.float32, assert_close, causal=True, softmax_scale=0.3)


def test_attention_packed_equals_attention_on_views():
    # same kernels, same tiles, only the addressing differs: bit-identical under the interpreter
    seq, batch, heads, kv_heads, dim = 21, 2, 4, 2, 16
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim)
    out = attention_packed(qkv, heads, kv_heads)
    split = kernels.attention(*_split(qkv, heads, kv_heads)).permute(2, 0, 1, 3).reshape(seq, batch, -1)
    assert torch.equal(out, split)


def test_attention_packed_layout_removes_copies():
    # the output is born in (S, B, H * D) and dqkv is one fresh (S, B, (H + 2 Hkv) * D) buffer
    seq, batch, heads, kv_heads, dim = 19, 2, 4, 2, 16
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim, requires_grad=True)
    out = attention_packed(qkv, heads, kv_heads)
    assert out.shape == (seq, batch, heads * dim)
    assert out.is_contiguous() and out._base is None
    (dqkv,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    assert dqkv.shape == qkv.shape
    assert dqkv.is_contiguous() and dqkv._base is None
    assert dqkv.untyped_storage().data_ptr() not in (qkv.untyped_storage().data_ptr(), out.untyped_storage().data_ptr())


def test_attention_packed_strided_qkv_and_dout_match_reference(assert_close):
    # qkv with (S, B) strides of a (B, S, F) buffer, dout with a non-unit last stride (copied by the wrapper)
    seq, batch, heads, kv_heads, dim = 20, 2, 2, 1, 16
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * dim).transpose(0, 1)
    dout = torch.randn(seq, batch, heads * dim, 2)[..., 0]
    assert not qkv.is_contiguous() and dout.stride(-1) != 1
    out, dqkv = _run_packed(attention_packed, qkv, heads, kv_heads, dout, causal=True)
    out_ref, dqkv_ref = _run_packed(_packed_reference, qkv, heads, kv_heads, dout, causal=True)
    assert_close(out, out_ref, torch.float32, "out")
    assert_close(dqkv, dqkv_ref, torch.float32, "dqkv")


@pytest.mark.parametrize("causal", [True, False])
def test_attention_packed_reference_path_matches(causal, monkeypatch, assert_close):
    # the CPU path without the interpreter: the torch reference behind the same reshapes
    monkeypatch.setenv("TRIDENT_KERNELS", "reference")
    seq, batch, heads, kv_heads, dim = 13, 2, 4, 2, 8
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim)
    dout = torch.randn(seq, batch, heads * dim)
    slopes = torch.rand(heads)
    out, dqkv = _run_packed(attention_packed, qkv, heads, kv_heads, dout, causal=causal, alibi_slopes=slopes)
    out_ref, dqkv_ref = _run_packed(_packed_reference, qkv, heads, kv_heads, dout, causal=causal, alibi_slopes=slopes)
    assert_close(out, out_ref, 1e-6, "out")
    assert_close(dqkv, dqkv_ref, 1e-6, "dqkv")


@pytest.mark.parametrize(
    "shape, heads, kv_heads, slopes, match",
    [
        ((8, 1, 4, 16), 2, 1, None, r"expects qkv \(S, B, .*\); got shape \(8, 1, 4, 16\)"),
        ((8, 1, 102), 2, 1, None, r"qkv \(8, 1, 102\): last dim 102 is not a positive multiple of .* = 4"),
        ((8, 1, 7 * 16), 3, 2, None, r"query heads \(3\) must be a multiple of kv heads \(2\)"),
        ((8, 1, 64), 2, 0, None, r"n_heads \(2\) and kv_heads \(0\) must be positive"),
        ((8, 1, 64), 2, 1, torch.ones(3), r"alibi_slopes must have shape \(2,\), got \(3,\)"),
    ],
    ids=["not-3d", "width-not-divisible", "heads-not-multiple", "zero-kv-heads", "alibi-shape"],
)
def test_attention_packed_rejects_bad_shapes(shape, heads, kv_heads, slopes, match):
    with pytest.raises(ValueError, match=match):
        attention_packed(torch.randn(*shape), heads, kv_heads, alibi_slopes=slopes)


def test_offsets_beyond_32_bits_are_refused():
    from engine.kernels.flash_attention import _check_offsets

    storage = torch.empty(2**32, device="meta")
    fits = storage.as_strided((1, 1, 2, 64), (0, 0, 2**31 - 64, 1))
    _check_offsets(fits)
    too_far = storage.as_strided((1, 1, 2, 64), (0, 0, 2**31, 1))
    with pytest.raises(ValueError, match=r"sequence stride 2147483648 reaches past element 2\*\*31 - 1"):
        _check_offsets(fits, too_far)
