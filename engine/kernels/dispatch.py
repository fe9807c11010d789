"""Which implementation runs a kernel call: Triton or the torch reference.

The choice is made per call from the tensors' device and two environment variables, read at call time
(never at import time) so tests and benchmarks can switch without re-importing:

* ``TRIDENT_KERNELS`` unset or ``auto``: Triton on CUDA tensors, the torch reference on CPU tensors.
* ``TRIDENT_KERNELS=reference``: always the torch reference.
* ``TRIDENT_KERNELS=triton``: always Triton; on CPU tensors this needs ``TRITON_INTERPRET=1`` (Triton's
  interpreter, how CI tests the kernels).

``triton.jit`` fixes at decoration time whether a kernel is compiled or interpreted, and Triton's own
``tl.sum``/``tl.max`` are decorated when triton is imported: so ``TRITON_INTERPRET=1`` must be in the
environment before triton is first imported. Setting it later is reported, not silently half-applied.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    """The value of ``TRIDENT_KERNELS`` (default ``auto``), validated."""
    mode = os.environ.get("TRIDENT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"TRIDENT_KERNELS={mode!r} is not one of {', '.join(MODES)} (hint: unset it to pick by device)"
        )
    return mode


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_loaded() -> bool:
    """Whether triton was imported with its interpreter on (its standard library is then interpreted)."""
    return isinstance(tl.standard.sum, InterpretedFunction)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` runs the Triton kernels (else the torch reference)."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and mode == "auto":
        return False
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "TRIDENT_KERNELS=triton on CPU tensors needs Triton's interpreter "
            "(hint: also set TRITON_INTERPRET=1, or unset TRIDENT_KERNELS to use the torch reference)"
        )
    if interpreting() != interpreter_loaded():
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if interpreting() else 'off'} now but was "
            f"{'on' if interpreter_loaded() else 'off'} when triton was imported "
            "(hint: set TRITON_INTERPRET before the first import of triton, e.g. in the shell or a conftest)"
        )
    return True


def launchable(kernel: Any) -> tuple[Any, bool]:
    """The kernel to launch now, and whether it is the autotuned form.

    Under the interpreter the autotuner is bypassed (it benchmarks on a GPU); callers then pass
    explicit block sizes.
    """
    if isinstance(kernel, triton.runtime.Autotuner):
        return (kernel.fn, False) if interpreting() else (kernel, True)
    return kernel, False
