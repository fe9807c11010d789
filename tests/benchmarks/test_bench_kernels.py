"""The kernel bench's fused-block cases build and run (on CPU, through the torch references), and each
fused form computes what its unfused torch form does: what the GPU bench times side by side."""

from __future__ import annotations

import pytest
import torch

from engine.benchmarks.kernels import fused_cases


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRIDENT_KERNELS", "reference")


@pytest.mark.parametrize("index", range(4))
def test_fused_case_matches_its_unfused_form(index):
    torch.manual_seed(0)
    name, unit, ours, theirs, work = fused_cases("cpu", tokens=64)[index]
    assert unit == "GB/s" and work > 0
    got, want = ours(), theirs()
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if name.startswith("rope"):  # the unfused form returns the (B, heads, S, hd) layout
            g = g.unflatten(-1, (48, 64)).permute(1, 2, 0, 3)
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2, msg=name)
