"""DeepSpeed's learning-rate schedules as pure functions (deepspeed/runtime/lr_schedules.py).

DeepSpeed's scheduler starts at ``last_batch_iteration = -1`` and is stepped after every optimizer step
that is not skipped. So the k-th applied update (k = 0, 1, ...) uses ``lr(k - 1)``: the first update runs
at the warmup start. ``LRSchedule.lr_for_update(k)`` returns exactly that value.
"""

from __future__ import annotations

import math

from engine.config import SchedulerConfig


class LRSchedule:
    def __init__(self, cfg: SchedulerConfig | None, *, base_lr: float) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        if cfg is not None:
            p = cfg.params
            self.warmup = max(2, p.warmup_num_steps)
            self.inv_log_warmup = 1.0 / math.log(self.warmup)
            self.min_lr = p.warmup_min_lr
            self.max_lr = p.warmup_max_lr if p.warmup_max_lr is not None else base_lr

    def _warmup_gamma(self, it: int) -> float:
        if self.cfg.params.warmup_type == "log":
            return self.inv_log_warmup * math.log(it + 1)
        return it / self.warmup

    def lr_at_iteration(self, it: int) -> float:
        """DeepSpeed's ``get_lr()`` at ``last_batch_iteration = it``."""
        if self.cfg is None:
            return self.base_lr
        kind, p = self.cfg.type, self.cfg.params
        if kind == "WarmupCosineLR":
            if it < 0:
                return 0.0
            if it < self.warmup:
                ratio = p.warmup_min_ratio + self._warmup_gamma(it) * (1.0 - p.warmup_min_ratio)
            else:
                total = max(1, p.total_num_steps - self.warmup)
                progress = min(1.0, (it - self.warmup + 1) / total)
                ratio = max(0.0, p.cos_min_ratio + (1.0 - p.cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)
            return self.base_lr * ratio
        if it < 0:
            return self.min_lr
        if it < self.warmup:
            gamma = self._warmup_gamma(it)
        elif kind == "WarmupDecayLR":
            gamma = max(0.0, (p.total_num_steps - it) / max(1.0, p.total_num_steps - self.warmup))
        else:  # WarmupLR holds the peak
            gamma = 1.0
        return self.min_lr + (self.max_lr - self.min_lr) * gamma

    def lr_for_update(self, applied_updates: int) -> float:
        return self.lr_at_iteration(applied_updates - 1)
