"""The fp32 flat gradient buffer of the stage-0 optimizer: a parameter's first gradient of a step is copied
into its view (no memset in zero_grad, no read of the fp32 buffer on the first micro-batch), later ones are
added, and a view that got no gradient by the time the step begins counts as zero. Gradients move into the
buffer in batches (foreach copy/add) during and at the end of each backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.config.sections import AdamParams, OptimizerConfig
from engine.optim.mixed_precision import MixedPrecisionOptimizer


class _TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(4, 3, generator=g))
        self.b = nn.Parameter(torch.randn(5, generator=g))

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        out = (x @ self.a).square().sum()
        return out + (self.b * x.sum()).sum() if use_b else out


def _grads(model: _TwoBranch, xs, use_b: bool) -> dict[str, torch.Tensor]:
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in xs:
        names = ["a", "b"] if use_b else ["a"]
        gs = torch.autograd.grad(model(x, use_b), [getattr(model, n) for n in names])
        for n, gr in zip(names, gs):
            total[n] += gr
    return total


def _optimizer(model: nn.Module) -> MixedPrecisionOptimizer:
    cfg = OptimizerConfig(type="AdamW", params=AdamParams(lr=1e-2))
    return MixedPrecisionOptimizer(model, cfg, clip=0.0, decay_embeddings=False)


def _flat_grads(opt: MixedPrecisionOptimizer) -> dict[str, torch.Tensor]:
    return {name: view.clone() for g in opt.groups for (name, _), (_, view) in zip(g.named_params, g.views(g.grad))}


@pytest.mark.parametrize("flush_elements", [1, 7, 1 << 24])  # every gradient, some, all at backward's end
def test_accumulates_over_micro_batches_and_zeroes_unused_views(monkeypatch, flush_elements):
    monkeypatch.setattr(MixedPrecisionOptimizer, "FLUSH_ELEMENTS", flush_elements)
    model = _TwoBranch()
    opt = _optimizer(model)
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    # step 1: both parameters used, three micro-batches
    want = _grads(model, xs, use_b=True)
    for x in xs:
        model(x, True).backward()
    got = _flat_grads(opt)
    for name in ("a", "b"):
        assert torch.allclose(got[name], want[name], rtol=1e-6, atol=1e-6), name
    opt.step(lr=1e-2, loss_scale=1.0)

    # step 2: b gets no gradient; its view still holds step 1's values until the step treats it as zero
    want = _grads(model, xs[:2], use_b=False)
    for x in xs[:2]:
        model(x, False).backward()
    assert not torch.equal(_flat_grads(opt)["b"], torch.zeros(5))  # stale bytes, logically zero
    b_before = model.b.detach().clone()
    result = opt.step(lr=1e-2, loss_scale=1.0)
    assert result.grad_norm == pytest.approx(want["a"].norm().item(), rel=1e-6)
    # b moved only by its Adam momentum from step 1, exactly as with a zero gradient
    ref = _TwoBranch()
    ref_opt = _optimizer(ref)
    for x in xs:
        ref(x, True).backward()
    ref_opt.step(lr=1e-2, loss_scale=1.0)
    for x in xs[:2]:
        ref(x, False).backward()
    for g in ref_opt.groups:
        for (name, _), (_, view) in zip(g.named_params, g.views(g.grad)):
            if name == "b":
                view.zero_()
    ref_opt.step(lr=1e-2, loss_scale=1.0)
    assert not torch.equal(model.b.detach(), b_before)
    assert torch.equal(model.b.detach(), ref.b.detach())
    assert torch.equal(model.a.detach(), ref.a.detach())


def test_overflow_skip_does_not_leak_into_the_next_step():
    model = _TwoBranch()
    opt = _optimizer(model)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    (model(x, True) * float("inf")).backward()
    assert opt.step(lr=1e-2, loss_scale=1.0).skipped
    want = _grads(model, [x], use_b=True)
    model(x, True).backward()
    result = opt.step(lr=1e-2, loss_scale=1.0)
    assert not result.skipped
    assert result.grad_norm == pytest.approx(math.sqrt(sum(g.square().sum().item() for g in want.values())), rel=1e-6)


def test_gradients_are_in_the_buffer_when_backward_returns():
    # with the default batch size nothing flushes mid-backward: the end-of-backward callback must have run
    model = _TwoBranch()
    opt = _optimizer(model)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    want = _grads(model, [x], use_b=True)
    model(x, True).backward()
    assert not opt._pending
    got = _flat_grads(opt)
    for name in ("a", "b"):
        assert torch.equal(got[name], want[name]), name
