"""Compiled kernels on CUDA at realistic sizes (marked gpu: skipped on CPU-only CI)."""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    monkeypatch.setenv("TRIDENT_KERNELS", "auto")


@pytest.mark.parametrize("dim", [64, 128, 80])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_cuda_bf16_matches_reference(dim, causal):
    q = torch.randn(2, 8, 1000, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 1000, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 1000, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = kernels.attention(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_ref = reference.attention(q, k, v, causal=causal)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout)
    assert _rel_err(out, out_ref) < 2e-2
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < 3e-2


@pytest.mark.parametrize("heads, kv_heads", [(16, 16), (8, 2)])
def test_attention_packed_cuda_bf16_matches_reference(heads, kv_heads):
    # the model's layout: (S, B, (h + 2 kv) * hd) in, (S, B, h * hd) out, one dqkv back
    seq, batch, dim = 1000, 2, 64
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = kernels.attention_packed(qkv, heads, kv_heads)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
    heads_view = qkv.unflatten(-1, (heads + 2 * kv_heads, dim)).permute(1, 2, 0, 3)
    q, k, v = heads_view[:, :heads], heads_view[:, heads : heads + kv_heads], heads_view[:, heads + kv_heads :]
    out_ref = reference.attention(q, k, v, causal=True).permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
    (dqkv_ref,) = torch.autograd.grad(out_ref, (qkv,), dout)
    assert out.is_contiguous() and dqkv.is_contiguous()
    assert _rel_err(out, out_ref) < 2e-2
    assert _rel_err(dqkv, dqkv_ref) < 3e-2


def test_norms_cuda_match_reference():
    x = torch.randn(4096, 5000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5000, device="cuda", dtype=torch.bfloat16)
    assert _rel_err(kernels.layer_norm(x, w, w), reference.layer_norm(x, w, w)) < 2e-2
    assert _rel_err(kernels.rms_norm(x, w), reference.rms_norm(x, w)) < 2e-2


def test_cross_entropy_cuda_peak_memory_below_quarter_of_fp32_logits():
    n, vocab = 8192, 50304
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (grad,) = torch.autograd.grad(kernels.cross_entropy(logits, target, inplace_backward=True), logits)
    peak = torch.cuda.max_memory_allocated() - base
    assert grad.data_ptr() == logits.data_ptr()
    assert peak <= n * vocab * 4 / 4 + (1 << 24)  # a quarter of fp32 logits, plus the (N,) statistics


def test_adamw_cuda_matches_torch():
    n = 10_000_019
    p = torch.randn(n, device="cuda")
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 4):
        g = torch.randn(n, device="cuda")
        kernels.adamw_(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        ref.grad = g
        opt.step()
    assert _rel_err(p, ref.detach()) < 1e-6


@pytest.mark.parametrize("n", [4096, 3000])
def test_bias_gelu_cuda_bf16_matches_reference(n):
    h = torch.randn(8192, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = kernels.bias_gelu(h, b)
    dy = torch.randn_like(y)
    dh, db = torch.autograd.grad(y, (h, b), dy)
    y_ref = reference.bias_gelu(h, b)
    dh_ref, db_ref = torch.autograd.grad(y_ref, (h, b), dy)
    assert _rel_err(y, y_ref) < 2e-2
    assert _rel_err(dh, dh_ref) < 2e-2
    assert _rel_err(db, db_ref) < 2e-2


def test_rope_packed_cuda_matches_reference():
    from engine.model.positions import rope_tables

    seq, batch, heads, kv_heads, dim = 1024, 4, 16, 4, 128
    cos, sin = (t.cuda() for t in rope_tables(seq, dim, theta=10000.0))
    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = kernels.rope_packed(qkv, cos, sin, heads, kv_heads)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (qkv,), dy)
    y_ref = reference.rope_packed(qkv, cos, sin, heads, kv_heads)
    (dx_ref,) = torch.autograd.grad(y_ref, (qkv,), dy)
    assert _rel_err(y, y_ref) < 1e-2
    assert _rel_err(dx, dx_ref) < 1e-2


def test_swiglu_cuda_bf16_matches_reference():
    x = torch.randn(8192, 2 * 2816, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = kernels.swiglu(x)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    y_ref = reference.swiglu(x)
    (dx_ref,) = torch.autograd.grad(y_ref, (x,), dy)
    assert _rel_err(y, y_ref) < 1e-2
    assert _rel_err(dx, dx_ref) < 1e-2


@pytest.mark.parametrize("hidden", [1024, 4096, 12288])
def test_add_layer_norm_cuda_matches_unfused(hidden):
    x = torch.randn(4096, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dsum, dy = torch.randn_like(x), torch.randn_like(x)
    total, y = kernels.add_layer_norm(x, r, w, b)
    grads = torch.autograd.grad((total, y), (x, r, w, b), (dsum, dy))
    total_ref, y_ref = reference.add_layer_norm(x, r, w, b)
    grads_ref = torch.autograd.grad((total_ref, y_ref), (x, r, w, b), (dsum, dy))
    assert torch.equal(total, total_ref)  # fp32 -> bf16 rounds to nearest even, as torch's bf16 add
    assert _rel_err(y, y_ref) < 2e-2
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < 2e-2
