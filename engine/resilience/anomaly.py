"""Detecting a training run going bad: NaN/Inf losses, loss spikes, fp16 loss-scale collapse.

Pure logic over the per-step metrics, so it is tested without a model. The trainer acts on a
trigger by rolling back (engine/trainer.py). Spike rule: the loss exceeds ``spike_factor`` x the mean
of the last ``spike_window`` accepted losses for ``spike_patience`` consecutive steps (PaLM restarted
~100 steps before such spikes and skipped the batches in between; Chowdhery et al. 2022, section 5.1).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from engine.config.sections import RollbackConfig

MIN_HISTORY = 5  # losses needed before the spike rule applies


@dataclass(frozen=True)
class Trigger:
    reason: str
    first_bad_step: int  # the first step of the anomaly: roll back to a checkpoint before it


class AnomalyDetector:
    def __init__(self, cfg: RollbackConfig, *, overflow_is_normal: bool) -> None:
        self.cfg = cfg
        # With fp16 dynamic scaling a non-finite gradient is an ordinary skipped step, not a NaN.
        self.overflow_is_normal = overflow_is_normal
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.spike_run = 0
        self.floor_run = 0

    def observe(
        self, *, step: int, loss: float, grad_norm: float, skipped: bool, scale_at_floor: bool
    ) -> Trigger | None:
        cfg = self.cfg
        if cfg.on_nan and (not math.isfinite(loss) or (not math.isfinite(grad_norm) and not self.overflow_is_normal)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return Trigger(f"non-finite {what} at step {step}", step)
        self.floor_run = self.floor_run + 1 if (skipped and scale_at_floor) else 0
        if cfg.scale_floor_steps and self.floor_run >= cfg.scale_floor_steps:
            return Trigger(
                f"fp16 loss scale at its floor with overflows for {self.floor_run} steps", step - self.floor_run + 1
            )
        if cfg.spike_factor > 0 and len(self.history) >= min(MIN_HISTORY, cfg.spike_window):
            mean = sum(self.history) / len(self.history)
            if loss > cfg.spike_factor * mean:
                self.spike_run += 1
                if self.spike_run >= cfg.spike_patience:
                    return Trigger(
                        f"loss {loss:.4g} > {cfg.spike_factor:g} x moving average {mean:.4g} for "
                        f"{self.spike_run} step(s)",
                        step - self.spike_run + 1,
                    )
                return None  # a spiking loss does not enter the average
        self.spike_run = 0
        if math.isfinite(loss) and not skipped:
            self.history.append(loss)
        return None

    def reset_runs(self) -> None:
        self.spike_run = 0
        self.floor_run = 0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spike_run": self.spike_run, "floor_run": self.floor_run}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.spike_window)
        self.spike_run = int(state["spike_run"])
        self.floor_run = int(state["floor_run"])
