"""Kernel tests run Triton's CPU interpreter.

Triton fixes interpreted-vs-compiled when it is imported, so TRITON_INTERPRET=1 is set here, at
collection, before this folder's modules import triton (on machines without CUDA only: on a GPU machine
it would turn the `gpu` tests into interpreter runs). If another folder imported triton first without
it, the interpreter tests fail with the reason; a top-level tests/conftest.py setting it avoids that.
Every test also sees TRIDENT_KERNELS=triton (monkeypatched, so other folders are unaffected), a fresh
seed (printed; TRIDENT_TEST_SEED replays one) and a magnitude-relative comparison.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# bf16/fp16 inputs: outputs are rounded to the dtype, so compare at its resolution
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def triton_interpreter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("gpu") is not None:
        return
    from engine.kernels.dispatch import interpreter_loaded

    if not interpreter_loaded():
        message = "triton was imported without TRITON_INTERPRET=1 (hint: set it in the environment)"
        if torch.cuda.is_available():
            pytest.skip(message)
        pytest.fail(message)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRIDENT_KERNELS", "triton")


@pytest.fixture(autouse=True)
def seed() -> int:
    value = int(os.environ.get("TRIDENT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={value} (replay with TRIDENT_TEST_SEED={value})")
    torch.manual_seed(value)
    return value


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | torch.dtype, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected|: relative to the tensor's magnitude.

    ``tol`` may be a dtype, meaning that dtype's entry in TOLERANCE.
    """
    tol = TOLERANCE[tol] if isinstance(tol, torch.dtype) else tol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double(), expected.double()
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:g} x max |expected| {scale:.3e}"


@pytest.fixture
def assert_close():
    return _assert_close
