"""The MFU formula (engine/metrics/flops.py): 6 x the parameters that take part in a matmul, plus the
attention term 12 * L * d * S, per trained token; checked against hand-computed figures for a GPT-2 and a
Llama config, against the parameters of the model as built, and against what engine.plan prints."""

from __future__ import annotations

import json

import pytest

from engine.config import ModelConfig, parse_config
from engine.metrics.flops import device_peak_tflops, flops_per_token, matmul_params, mfu
from engine.model.transformer import Transformer, count_parameters
from engine.planning import plan

GPT2_124M = ModelConfig(arch="gpt2", n_layers=12, d_model=768, n_heads=12, seq_len=1024, vocab_size=50304)
# by hand: per layer qkv 768x2304 + 2304, out 768x768 + 768, up 768x3072 + 3072, down 3072x768 + 768, two
# LayerNorms 2x(768 + 768); the final LayerNorm; the (tied) head 50304 x 768
GPT2_MATMUL = (
    12 * (768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 4 * 768) + 2 * 768 + 50304 * 768
)
GPT2_FLOPS = 6 * GPT2_MATMUL + 12 * 12 * 768 * 1024

LLAMA_SMALL = ModelConfig(
    arch="llama", n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, seq_len=512, vocab_size=1000, tie_embeddings=False
)
# head_dim 32: q 256x256, k and v 256x64 each, o 256x256; SwiGLU ffn 704 (8/3 x 256 rounded up to 64):
# gate and up 256x704, down 704x256; two RMSNorms per layer and a final one; the untied head 1000 x 256
LLAMA_MATMUL = 4 * (256 * 256 + 2 * 256 * 64 + 256 * 256 + 3 * 256 * 704 + 2 * 256) + 256 + 1000 * 256
LLAMA_FLOPS = 6 * LLAMA_MATMUL + 12 * 4 * 256 * 512


@pytest.mark.parametrize(
    "cfg, matmul, flops", [(GPT2_124M, GPT2_MATMUL, GPT2_FLOPS), (LLAMA_SMALL, LLAMA_MATMUL, LLAMA_FLOPS)]
)
def test_flops_per_token_equals_the_hand_computed_formula(cfg, matmul, flops):
    assert matmul_params(cfg) == matmul
    assert flops_per_token(cfg) == flops


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="gpt2", n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab_size=300),
        ModelConfig(
            arch="llama",
            n_layers=2,
            d_model=64,
            n_heads=4,
            n_kv_heads=2,
            seq_len=32,
            vocab_size=300,
            tie_embeddings=False,
        ),
    ],
)
def test_counted_parameters_are_the_built_models(cfg):
    model = Transformer(cfg, seed=0)
    built = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg)["total"] == built
    lookups = cfg.vocab_size * cfg.d_model + (cfg.seq_len * cfg.d_model if cfg.pos == "learned" else 0)
    head = cfg.vocab_size * cfg.d_model  # tied or not, the head is a matmul
    assert matmul_params(cfg) == built - lookups + (head if cfg.tie_embeddings else 0)


def test_mfu_and_peak_table():
    tflops, util = mfu(10_000.0, GPT2_124M, 989.0)
    assert tflops == pytest.approx(10_000.0 * GPT2_FLOPS / 1e12)
    assert util == pytest.approx(tflops / 989.0)
    assert mfu(1.0, GPT2_124M, None)[1] is None
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert device_peak_tflops(None, "bf16") is None


def test_plan_prints_the_same_flops_per_token():
    cfg = parse_config({"train_batch_size": 8, "model": json.loads(json.dumps(GPT2_124M.__dict__))})
    lines = plan(cfg, world_size=1, tokens=1e9, mfu=0.5, peak_tflops=989.0)
    line = next(x for x in lines if x.startswith("flops/token"))
    assert line.split()[1] == f"{GPT2_FLOPS:.4g}"
    total = next(x for x in lines if x.startswith("training flops"))
    assert total.split()[2] == f"{GPT2_FLOPS * 1e9:.4g}"
