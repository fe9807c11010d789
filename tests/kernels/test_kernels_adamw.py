"""Fused AdamW against torch.optim.AdamW(foreach=False), and its inf/nan skip."""

from __future__ import annotations

import pytest
import torch

from engine import kernels

HP = dict(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _torch_adamw(param: torch.Tensor) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    p = torch.nn.Parameter(param.clone())
    opt = torch.optim.AdamW(
        [p],
        lr=HP["lr"],
        betas=(HP["beta1"], HP["beta2"]),
        eps=HP["eps"],
        weight_decay=HP["weight_decay"],
        foreach=False,
        fused=False,
    )
    return p, opt


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_matches_torch_over_several_steps(grad_dtype, assert_close):
    n, scale = 1000, 256.0  # not a multiple of the block; power-of-two loss scale as a scaler would use
    param = torch.randn(n)
    ref, opt = _torch_adamw(param)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.float16)
    for step in range(1, 6):
        grad = (torch.randn(n) * scale).to(grad_dtype)
        found = kernels.adamw_(param, grad, exp_avg, exp_avg_sq, step=step, grad_scale=scale, out=out, **HP)
        ref.grad = grad.float() / scale
        opt.step()
        assert found.item() == 0.0
        assert_close(param, ref.detach(), 1e-6, f"param step {step}")
        assert_close(exp_avg, opt.state[ref]["exp_avg"], 1e-6, "exp_avg")
        assert_close(exp_avg_sq, opt.state[ref]["exp_avg_sq"], 1e-6, "exp_avg_sq")
        assert torch.equal(out, param.to(torch.float16))  # the compute copy is the rounded master


def test_adamw_bf16_copy_out_is_the_updated_master_within_one_ulp():
    # GPUs round fp32 -> bf16 to nearest even; Triton's interpreter truncates, so allow either neighbour
    n = 333
    param = torch.randn(n)
    out = torch.zeros(n, dtype=torch.bfloat16)
    kernels.adamw_(param, torch.randn(n), torch.zeros(n), torch.zeros(n), step=1, out=out, **HP)
    ulp = torch.finfo(torch.bfloat16).eps * param.abs()  # spacing of bf16 numbers near each weight
    assert ((out.float() - param).abs() <= ulp).all()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_adamw_non_finite_grad_skips_the_whole_step(bad):
    n = 300
    param, exp_avg, exp_avg_sq = torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.1
    out = torch.zeros(n, dtype=torch.float16)
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq, out)]
    grad = torch.randn(n)
    grad[n - 7] = bad  # in the last, partial block
    found = kernels.adamw_(param, grad, exp_avg, exp_avg_sq, step=3, out=out, **HP)
    assert found.item() == 1.0
    for t, t0 in zip((param, exp_avg, exp_avg_sq, out), before):
        assert torch.equal(t, t0)


def test_adamw_overflow_after_unscaling_is_not_detected_before_it():
    # fp16 grads are finite; dividing by a scale < 1 would overflow fp16 but not fp32: the step applies
    grad = torch.full((64,), 60000.0, dtype=torch.float16)
    param = torch.zeros(64)
    found = kernels.adamw_(param, grad, torch.zeros(64), torch.zeros(64), step=1, grad_scale=0.5, **HP)
    assert found.item() == 0.0
    assert not torch.equal(param, torch.zeros(64))


def test_adamw_respects_a_flag_raised_elsewhere():
    # e.g. another ZeRO shard found an inf and the flag was all-reduced before this call
    param = torch.randn(50)
    before = param.clone()
    flag = torch.ones(1)
    found = kernels.adamw_(param, torch.randn(50), torch.zeros(50), torch.zeros(50), step=1, found_inf=flag, **HP)
    assert found is flag and found.item() == 1.0
    assert torch.equal(param, before)


def test_adamw_one_pass_equals_the_checked_step_bit_for_bit():
    # check_finite=False (the engine's path: it already knows the global grad norm is finite) skips only
    # the check pass; the update itself is the same arithmetic
    n = 777
    grad = torch.randn(n, dtype=torch.bfloat16)
    base = [torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.1]
    states = [[t.clone() for t in base] for _ in range(2)]
    kernels.adamw_(*states[0][:1], grad, *states[0][1:], step=4, grad_scale=8.0, **HP)
    found = kernels.adamw_(*states[1][:1], grad, *states[1][1:], step=4, grad_scale=8.0, check_finite=False, **HP)
    assert found.item() == 0.0 and not torch.equal(states[1][0], base[0])
    for a, b in zip(*states):
        assert torch.equal(a, b)


def test_adamw_one_pass_still_skips_on_a_raised_flag():
    param = torch.randn(90)
    before = param.clone()
    flag = torch.ones(1)
    found = kernels.adamw_(
        param, torch.randn(90), torch.zeros(90), torch.zeros(90), step=1, found_inf=flag, check_finite=False, **HP
    )
    assert found is flag and torch.equal(param, before)


def test_adamw_rejects_non_fp32_master_weights():
    with pytest.raises(ValueError, match=r"adamw_: param must be a flat contiguous fp32 tensor, got torch.bfloat16"):
        kernels.adamw_(
            torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), torch.zeros(4), torch.zeros(4), step=1, **HP
        )


def test_adamw_rejects_step_zero():
    with pytest.raises(ValueError, match="adamw_: step counts from 1, got 0"):
        kernels.adamw_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), step=0, **HP)
