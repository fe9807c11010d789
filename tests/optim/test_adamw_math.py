"""AdamW over flat fp32 tensors (engine/optim/adamw.py): equal to torch.optim.AdamW with bias correction,
the uncorrected update with optimizer.params.bias_correction false, and DeepSpeed's L2 Adam
(adam_w_mode false) folding the decay into the gradient."""

from __future__ import annotations

import math

import torch

from engine.optim.adamw import adamw_update

HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _run(steps: int, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    p = torch.randn(64)
    m, v = torch.zeros(64), torch.zeros(64)
    for step in range(1, steps + 1):
        g = torch.sin(p * step)
        adamw_update(p, g, m, v, step=step, **HP, **kw)
    return p


def test_bias_corrected_update_equals_torch_adamw():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64))
    opt = torch.optim.AdamW(
        [p],
        lr=HP["lr"],
        betas=(HP["beta1"], HP["beta2"]),
        eps=HP["eps"],
        weight_decay=HP["weight_decay"],
        foreach=False,
    )
    for step in range(1, 6):
        p.grad = torch.sin(p.detach() * step)
        opt.step()
    torch.testing.assert_close(_run(5, bias_correction=True), p.detach(), rtol=0, atol=1e-6)


def test_bias_correction_false_is_the_uncorrected_update():
    torch.manual_seed(0)
    p = torch.randn(64)
    m, v = torch.zeros(64), torch.zeros(64)
    b1, b2 = HP["beta1"], HP["beta2"]
    for step in range(1, 4):
        g = torch.sin(p * step)
        p = p * (1 - HP["lr"] * HP["weight_decay"])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - HP["lr"] * m / (v.sqrt() + HP["eps"])
    got = _run(3, bias_correction=False)
    torch.testing.assert_close(got, p, rtol=0, atol=1e-6)
    assert (got - _run(3, bias_correction=True)).abs().max() > 1e-3  # the correction matters early on


def test_l2_adam_adds_the_decay_to_the_gradient():
    torch.manual_seed(0)
    p = torch.randn(64)
    m, v = torch.zeros(64), torch.zeros(64)
    g = torch.sin(p) + HP["weight_decay"] * p
    m = (1 - HP["beta1"]) * g
    v = (1 - HP["beta2"]) * g * g
    want = p - HP["lr"] / (1 - HP["beta1"]) * m / (v.sqrt() / math.sqrt(1 - HP["beta2"]) + HP["eps"])
    torch.testing.assert_close(_run(1, decoupled=False), want, rtol=0, atol=1e-6)
