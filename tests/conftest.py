"""Suite-wide setup. Triton decides compiled vs interpreted when it is first imported, so on machines
without CUDA the interpreter is switched on here, before any test module can import triton. On CPU the
model still uses the torch references unless TRIDENT_KERNELS=triton is set (see kernels/dispatch.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
