"""The standard GPT initialisation (model.init_std): every matrix N(0, init_std), the residual projections
(attention out, MLP down) N(0, init_std / sqrt(2 * n_layers)), biases zero, norms one."""

from __future__ import annotations

import math

import pytest

from engine.config import ModelConfig
from engine.model.transformer import Transformer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_init_std_and_scaled_residual_projections(arch):
    cfg = ModelConfig(arch=arch, n_layers=4, d_model=256, n_heads=4, seq_len=64, vocab_size=512, init_std=0.05)
    model = Transformer(cfg, seed=3)
    residual = 0.05 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif p.ndim == 1:
            assert (p == 1).all(), name  # norm weights
        else:
            want = residual if name.endswith(("attn.out.weight", "mlp.down.weight")) else 0.05
            assert p.mean().abs() < 4 * want / math.sqrt(p.numel()), name
            assert p.std().item() == pytest.approx(want, rel=0.05), name
