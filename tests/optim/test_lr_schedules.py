"""Each schedule equals DeepSpeed's own scheduler, update by update."""

import pytest
import torch

from engine.config import SchedulerConfig, SchedulerParams
from engine.optim.lr_schedules import LRSchedule

CASES = [
    ("WarmupLR", dict(warmup_min_lr=1e-5, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="log")),
    ("WarmupLR", dict(warmup_min_lr=0.0, warmup_num_steps=7, warmup_type="linear")),
    (
        "WarmupDecayLR",
        dict(warmup_min_lr=0.0, warmup_max_lr=2e-3, warmup_num_steps=5, total_num_steps=30, warmup_type="linear"),
    ),
    (
        "WarmupCosineLR",
        dict(warmup_num_steps=5, total_num_steps=40, warmup_min_ratio=0.1, cos_min_ratio=0.1, warmup_type="linear"),
    ),
    ("WarmupCosineLR", dict(warmup_num_steps=8, total_num_steps=25, warmup_type="log")),
]


@pytest.mark.parametrize("kind, params", CASES)
def test_matches_deepspeed(kind, params):
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    base_lr = 6e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    ref = getattr(lr_schedules, kind)(opt, **params)
    ours = LRSchedule(SchedulerConfig(type=kind, params=SchedulerParams(**params)), base_lr=base_lr)
    for k in range(45):
        # DeepSpeed: the optimizer steps at the current lr, then the scheduler steps.
        assert ours.lr_for_update(k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        ref.step()


def test_constant_without_scheduler():
    s = LRSchedule(None, base_lr=1e-3)
    assert [s.lr_for_update(k) for k in range(3)] == [1e-3] * 3


def test_cosine_reaches_floor_and_stays():
    p = SchedulerParams(warmup_num_steps=10, total_num_steps=100, cos_min_ratio=0.1, warmup_type="linear")
    s = LRSchedule(SchedulerConfig(type="WarmupCosineLR", params=p), base_lr=1.0)
    lrs = [s.lr_for_update(k) for k in range(150)]
    assert lrs[:2] == [0.0, 0.0]  # DeepSpeed: the first update runs at the warmup start
    assert max(lrs) == lrs[11] > 0.999  # peak right after warmup
    assert all(a >= b for a, b in zip(lrs[11:100], lrs[12:101]))  # monotone cosine decay
    assert lrs[100:] == [pytest.approx(0.1)] * 50
