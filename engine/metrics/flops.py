"""Model FLOPs and MFU.

Training FLOPs per token (forward + backward = 3x forward), following PaLM (Chowdhery et al. 2022,
appendix B) and Korthikanti et al. 2022:

    flops_per_token = 6 * N_matmul + 12 * n_layers * d_model * seq_len

N_matmul counts every parameter that takes part in a matrix multiply: all non-embedding parameters
plus the output head (V x d, tied or not); input-embedding and position lookups do no FLOPs. The
second term is attention's QK^T and AV products (2 matmuls x 2 FLOPs x S x d per layer forward, x3 for
backward), counted in full as is conventional even though causal masking skips half. Activation
recomputation is *not* counted: MFU measures model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from engine.config import ModelConfig

# Dense (non-sparse) peak TFLOP/s per device by precision, from the vendors' datasheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},  # fp32 via TF32 tensor cores
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
}


def matmul_params(cfg: ModelConfig) -> int:
    from engine.model.transformer import count_parameters

    counts = count_parameters(cfg)
    return counts["non_embedding"] + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len


def device_peak_tflops(device_name: str | None, dtype: str) -> float | None:
    """Peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None when unknown (e.g. CPU)."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # 'H100 PCIe' before 'H100'
        if all(part in device_name for part in key.split()):
            return PEAK_TFLOPS[key][dtype]
    return None


def mfu(tokens_per_s_per_device: float, cfg: ModelConfig, peak_tflops: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s per device, MFU in [0, 1] or None without a peak)."""
    tflops = tokens_per_s_per_device * flops_per_token(cfg) / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)
