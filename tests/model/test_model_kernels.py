"""model.kernels: the transformer on Trident's Triton kernels (interpreted on CPU) equals the torch path."""

import os

import pytest
import torch

from engine.config import ModelConfig
from engine.model.transformer import Transformer

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


# every variant takes the packed attention path (no permute copies); llama's rope is applied on the packed qkv
@pytest.mark.parametrize(
    "arch, pos, recompute",
    [
        ("gpt2", None, "none"),
        ("gpt2", None, "selective"),
        ("llama", None, "none"),
        ("llama", None, "selective"),
        ("llama", "alibi", "none"),
    ],
)
def test_kernels_match_torch_path(monkeypatch, arch, pos, recompute):
    monkeypatch.setenv("TRIDENT_KERNELS", "triton")
    cfg = ModelConfig(
        arch=arch,
        n_layers=2,
        d_model=64,
        n_heads=2,
        n_kv_heads=1 if arch == "llama" else None,
        seq_len=24,
        vocab_size=70,
        position=pos,
        recompute=recompute,
    )
    ids = torch.randint(0, 70, (2, 25), generator=torch.Generator().manual_seed(1))
    results = []
    for use_kernels in (False, True):
        model = Transformer(cfg, seed=3, use_kernels=use_kernels)
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=name)
