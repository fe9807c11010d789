"""Trident's fused Triton kernels and their torch references.

Each public function dispatches per call (see :mod:`engine.kernels.dispatch`): Triton on CUDA tensors, the
torch reference (:mod:`engine.kernels.reference`) on CPU, Triton's interpreter on CPU when
``TRIDENT_KERNELS=triton`` and ``TRITON_INTERPRET=1``. This package imports only torch and triton.
"""

from engine.kernels.adamw import adamw_
from engine.kernels.chunked_cross_entropy import (
    combine_vocab_parallel_stats,
    cross_entropy,
    vocab_parallel_grad,
    vocab_parallel_stats,
)
from engine.kernels.dispatch import use_triton
from engine.kernels.flash_attention import attention, attention_packed
from engine.kernels.gelu import bias_gelu
from engine.kernels.glu import swiglu
from engine.kernels.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from engine.kernels.rope import rope_packed

__all__ = [
    "adamw_",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "attention_packed",
    "bias_gelu",
    "combine_vocab_parallel_stats",
    "cross_entropy",
    "layer_norm",
    "rms_norm",
    "rope_packed",
    "swiglu",
    "use_triton",
    "vocab_parallel_grad",
    "vocab_parallel_stats",
]
