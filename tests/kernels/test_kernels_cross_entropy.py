"""Chunked cross-entropy and its vocab-parallel building blocks against the full-vocabulary reference.

Vocabularies of 150-301 ids span several of the interpreter's 64-wide chunks.
"""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import reference


def _loss_and_grad(fn, logits, target, dloss, **kw):
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, target, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, dloss)
    return loss.detach(), grad


def _targets(n: int, vocab: int, ignore_every: int = 3) -> torch.Tensor:
    target = torch.randint(0, vocab, (n,))
    target[::ignore_every] = -100
    return target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_matches_reference(reduction, dtype, assert_close):
    n, vocab = 7, 301
    logits = (torch.randn(n, vocab) * 3).to(dtype)
    target = _targets(n, vocab)
    dloss = torch.randn(n) if reduction == "none" else torch.tensor(1.7)
    loss, grad = _loss_and_grad(kernels.cross_entropy, logits, target, dloss, reduction=reduction)
    loss_ref, grad_ref = _loss_and_grad(reference.cross_entropy, logits, target, dloss, reduction=reduction)
    assert loss.dtype == torch.float32
    assert_close(loss, loss_ref, 1e-5, "loss")  # statistics are fp32 whatever the logits' dtype
    assert_close(grad, grad_ref, dtype, "grad")
    assert grad[::3].abs().max().item() == 0.0  # ignored rows get no gradient


def test_cross_entropy_accepts_leading_dims_and_custom_ignore_index(assert_close):
    logits = torch.randn(2, 5, 150)
    target = torch.randint(0, 150, (2, 5))
    target[1, 2] = 7
    loss, grad = _loss_and_grad(kernels.cross_entropy, logits, target, torch.tensor(1.0), ignore_index=7)
    loss_ref, grad_ref = _loss_and_grad(reference.cross_entropy, logits, target, torch.tensor(1.0), ignore_index=7)
    assert_close(loss, loss_ref, 1e-5, "loss")
    assert_close(grad, grad_ref, 1e-5, "grad")


def test_cross_entropy_inplace_backward_writes_into_logits(assert_close):
    base = torch.randn(5, 200, requires_grad=True)
    target = _targets(5, 200)
    logits = base * 1.0  # a non-leaf, as an lm-head output would be
    kernels.cross_entropy(logits, target, inplace_backward=True).backward()
    _, grad_ref = _loss_and_grad(reference.cross_entropy, base.detach(), target, torch.tensor(1.0))
    assert_close(base.grad, grad_ref, 1e-5, "grad")
    assert torch.equal(logits.detach(), base.grad)  # the gradient now lives in the logits' storage


def test_cross_entropy_all_ignored_is_nan_like_torch():
    loss = kernels.cross_entropy(torch.randn(3, 70), torch.full((3,), -100))
    assert torch.isnan(loss).item()


@pytest.mark.parametrize(
    "bounds",
    [[0, 128, 257], [0, 70, 160, 257], [0, 64, 130, 200, 257]],
    ids=["tp2", "tp3-uneven", "tp4-uneven"],
)
def test_vocab_parallel_shards_reproduce_full_vocab_loss_and_grad(bounds, assert_close):
    n, vocab = 6, bounds[-1]
    logits = torch.randn(n, vocab) * 4
    target = _targets(n, vocab)
    shards = [(start, logits[:, start:end].contiguous()) for start, end in zip(bounds, bounds[1:])]
    # each "rank" computes its statistics; the stacks stand in for an all-gather over the TP group
    stats = [kernels.vocab_parallel_stats(shard, target, vocab_start=start) for start, shard in shards]
    lse, target_logit = kernels.combine_vocab_parallel_stats(*(torch.stack(s) for s in zip(*stats)))
    valid = target != -100
    rows = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
    loss = rows.sum() / valid.sum()
    assert_close(loss, reference.cross_entropy(logits, target), 1e-5, "loss")

    dloss_rows = torch.full((n,), 1.0) / valid.sum()
    grads = [kernels.vocab_parallel_grad(shard, target, lse, dloss_rows, vocab_start=start) for start, shard in shards]
    _, grad_ref = _loss_and_grad(reference.cross_entropy, logits, target, torch.tensor(1.0))
    assert_close(torch.cat(grads, dim=1), grad_ref, 1e-5, "grad")


def test_vocab_parallel_two_allreduce_form_matches_combine(assert_close):
    # the max-then-sum all-reduce protocol from the module docstring gives the same lse
    logits, target = torch.randn(4, 190), torch.randint(0, 190, (4,))
    stats = [
        kernels.vocab_parallel_stats(logits[:, s:e].contiguous(), target, vocab_start=s)
        for s, e in [(0, 95), (95, 190)]
    ]
    global_max = torch.stack([m for m, _, _ in stats]).max(dim=0).values
    sumexp = sum(se * torch.exp(m - global_max) for m, se, _ in stats)
    lse, _ = kernels.combine_vocab_parallel_stats(*(torch.stack(s) for s in zip(*stats)))
    assert_close(global_max + torch.log(sumexp), lse, 1e-6, "lse")
    assert_close(lse, torch.logsumexp(logits, dim=1), 1e-5, "lse vs torch")


def test_cross_entropy_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction='avg' is not one of mean, sum, none"):
        kernels.cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), reduction="avg")
