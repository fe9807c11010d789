"""fp16 loss scaling with exactly DeepSpeed's semantics (deepspeed/runtime/fp16/loss_scaler.py).

Dynamic scaling: start at 2**initial_scale_power. On an overflow the step is skipped; if hysteresis is
exhausted (``cur_hysteresis == 1`` or hysteresis == 1) the scale halves (never below min_loss_scale),
otherwise hysteresis drops by one. After ``loss_scale_window`` clean steps since the last overflow the
scale doubles and hysteresis refills (``consecutive_hysteresis`` refills it after every clean step).
An overflow while the scale already sits at its floor with hysteresis exhausted raises
``LossScaleCollapseError`` (DeepSpeed's ``raise_error_at_min_scale``): training cannot progress.
"""

from __future__ import annotations

from engine.errors import LossScaleCollapseError


class StaticLossScaler:
    """A fixed scale (``fp16.loss_scale > 0``), or 1.0 for bf16/fp32. Overflow steps are still skipped."""

    dynamic = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)
        self.hysteresis = 0

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    dynamic = True

    def __init__(
        self,
        *,
        initial_scale_power: int = 16,
        scale_window: int = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_scale: float = 1.0,
        scale_factor: float = 2.0,
        raise_error_at_min_scale: bool = True,
    ) -> None:
        self.scale = float(2**initial_scale_power)
        self.scale_window = scale_window
        self.delayed_shift = hysteresis
        self.hysteresis = hysteresis
        self.consecutive_hysteresis = consecutive_hysteresis
        self.min_scale = float(min_scale)
        self.scale_factor = scale_factor
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1

    def update(self, overflow: bool) -> None:
        """Advance the state machine by one step (call once per optimizer step, skipped or not)."""
        if overflow:
            if self.delayed_shift == 1 or self.hysteresis == 1:
                if self.scale == self.min_scale and self.raise_error_at_min_scale:
                    raise LossScaleCollapseError(
                        f"fp16 loss scale is at its floor (fp16.min_loss_scale={self.min_scale:g}) and gradients "
                        f"still overflow at step {self.cur_iter}",
                        hint="lower the learning rate, use bf16, or roll back to an earlier checkpoint",
                    )
                self.scale = max(self.scale / self.scale_factor, self.min_scale)
            else:
                self.hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.hysteresis = self.delayed_shift
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis = self.delayed_shift
                self.scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "hysteresis": self.hysteresis,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis = int(state["hysteresis"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])


def build_loss_scaler(fp16_cfg, *, raise_at_floor: bool = True) -> StaticLossScaler | DynamicLossScaler:
    """From the ``fp16`` section; bf16/fp32 get a static scale of 1. ``raise_at_floor=False`` when the
    rollback guard handles a collapsed scale instead of stopping the run."""
    if not fp16_cfg.enabled:
        return StaticLossScaler(1.0)
    if fp16_cfg.loss_scale > 0:
        return StaticLossScaler(fp16_cfg.loss_scale)
    return DynamicLossScaler(
        initial_scale_power=fp16_cfg.initial_scale_power,
        scale_window=fp16_cfg.loss_scale_window,
        hysteresis=fp16_cfg.hysteresis,
        consecutive_hysteresis=fp16_cfg.consecutive_hysteresis,
        min_scale=fp16_cfg.min_loss_scale,
        raise_error_at_min_scale=raise_at_floor,
    )
