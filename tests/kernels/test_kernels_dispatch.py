"""Which implementation a call runs: decided per call from the device and the environment."""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import adamw, chunked_cross_entropy, flash_attention, norm, reference
from engine.kernels.dispatch import use_triton


def _forbid_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    def launch_refused(kernel):
        raise AssertionError(f"Triton kernel {kernel} launched on the reference path")

    for module in (adamw, chunked_cross_entropy, flash_attention, norm):
        monkeypatch.setattr(module, "launchable", launch_refused)


def test_cpu_without_env_vars_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRIDENT_KERNELS")
    monkeypatch.delenv("TRITON_INTERPRET")
    _forbid_triton(monkeypatch)
    x, w, b = torch.randn(3, 40), torch.randn(40), torch.randn(40)
    assert use_triton(x) is False
    assert torch.equal(kernels.layer_norm(x, w, b), reference.layer_norm(x, w, b))
    assert torch.equal(kernels.rms_norm(x, w), reference.rms_norm(x, w))
    q = torch.randn(1, 2, 9, 16)
    assert torch.equal(kernels.attention(q, q, q), reference.attention(q, q, q))
    target = torch.randint(0, 40, (3,))
    assert torch.equal(kernels.cross_entropy(x, target), reference.cross_entropy(x, target))
    p1, p2 = torch.randn(40), None
    p2 = p1.clone()
    state1, state2 = [torch.zeros(40) for _ in range(2)], [torch.zeros(40) for _ in range(2)]
    hp = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)
    kernels.adamw_(p1, w, *state1, **hp)
    reference.adamw_(p2, w, *state2, **hp)
    assert torch.equal(p1, p2)


def test_reference_can_be_forced_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRIDENT_KERNELS", "reference")
    _forbid_triton(monkeypatch)
    x, w = torch.randn(2, 30), torch.randn(30)
    assert use_triton(x) is False
    assert torch.equal(kernels.rms_norm(x, w), reference.rms_norm(x, w))


def test_env_is_read_at_call_time(monkeypatch):
    x = torch.randn(2, 8)
    assert use_triton(x) is True  # the conftest's TRIDENT_KERNELS=triton, TRITON_INTERPRET=1
    monkeypatch.setenv("TRIDENT_KERNELS", "auto")
    assert use_triton(x) is False
    monkeypatch.setenv("TRIDENT_KERNELS", "Triton")
    assert use_triton(x) is True


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        RuntimeError, match=r"^TRIDENT_KERNELS=triton on CPU tensors needs Triton's interpreter \(hint: also"
    ):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("TRIDENT_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"^TRIDENT_KERNELS='cuda' is not one of auto, triton, reference"):
        use_triton(torch.randn(2))
