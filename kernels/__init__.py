"""Trident's fused Triton kernels and their torch references.

Each public function dispatches per call (see :mod:`kernels.dispatch`): Triton on CUDA tensors, the
torch reference (:mod:`kernels.reference`) on CPU, Triton's interpreter on CPU when
``TRIDENT_KERNELS=triton`` and ``TRITON_INTERPRET=1``. This package imports only torch and triton.
"""

from kernels.adamw import adamw_
from kernels.chunked_cross_entropy import (
    combine_vocab_parallel_stats,
    cross_entropy,
    vocab_parallel_grad,
    vocab_parallel_stats,
)
from kernels.dispatch import use_triton
from kernels.flash_attention import attention, attention_packed
from kernels.gelu import bias_gelu
from kernels.glu import swiglu
from kernels.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from kernels.rope import rope_packed

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
