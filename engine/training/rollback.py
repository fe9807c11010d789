"""Automatic rollback (``resilience.rollback``): when the run goes bad, restore the newest checkpoint
saved before the anomaly, multiply the learning rate by ``lr_factor`` and skip the batches the run
consumed since (OPT-175B restarted from earlier checkpoints with a lower LR; PaLM skipped 200-500
batches around each spike). Every intervention is logged to metrics.jsonl and kept in later
checkpoints, so a resumed run carries the lowered LR and the skip."""

from __future__ import annotations

from engine.checkpoint import store
from engine.config import TridentConfig
from engine.errors import ConfigError, TridentError
from engine.resilience.anomaly import AnomalyDetector


class RollbackGuard:
    def __init__(self, cfg: TridentConfig) -> None:
        self.cfg = cfg.resilience.rollback
        self.save_dir = cfg.train.save_dir
        if self.cfg.enabled and not (cfg.train.save_dir and cfg.train.save_interval):
            raise ConfigError(
                "resilience.rollback.enabled: needs train.save_dir and train.save_interval > 0 "
                "(there must be checkpoints to roll back to)"
            )
        dynamic_fp16 = cfg.fp16.enabled and cfg.fp16.loss_scale == 0
        self.detector = AnomalyDetector(self.cfg, overflow_is_normal=dynamic_fp16)
        self.min_scale = cfg.fp16.min_loss_scale if dynamic_fp16 else None
        self.lr_scale = 1.0
        self.interventions: list[dict] = []

    @property
    def handles_scale_collapse(self) -> bool:
        return self.cfg.enabled and self.cfg.scale_floor_steps > 0

    def check(self, trainer, rec: dict) -> bool:
        """Observe one step; on a trigger roll ``trainer`` back and return True."""
        if not self.cfg.enabled:
            return False
        at_floor = self.min_scale is not None and rec["loss_scale"] <= self.min_scale
        trigger = self.detector.observe(
            step=rec["step"],
            loss=rec["loss"],
            grad_norm=rec["grad_norm"],
            skipped=rec.get("skipped_now", False),
            scale_at_floor=at_floor,
        )
        if trigger is None:
            return False
        self.rollback(trainer, reason=trigger.reason, before_step=trigger.first_bad_step)
        return True

    def rollback(self, trainer, *, reason: str, before_step: int) -> None:
        if len(self.interventions) >= self.cfg.max_rollbacks:
            raise TridentError(
                f"resilience.rollback: {reason}; giving up after {len(self.interventions)} rollbacks",
                hint="inspect the data around these steps or lower the learning rate",
            )
        consumed = trainer.loader.consumed_samples
        trainer.finalize_save()  # a checkpoint still being written in the background counts once committed
        path = store.latest_checkpoint(self.save_dir, warn=trainer.log.warning, before_step=before_step)
        history = list(self.interventions)
        lr_scale = self.lr_scale * self.cfg.lr_factor
        trainer.load(path)  # restores model, optimizer, scaler, RNG, step and (older) guard state
        skipped_from = trainer.loader.consumed_samples
        trainer.loader.load_state_dict({"consumed_samples": consumed})  # skip the offending window
        self.lr_scale = lr_scale
        self.detector.reset_runs()
        event = {
            "step": trainer.step,
            "event": "rollback",
            "reason": reason,
            "restored": path,
            "skipped_samples": [skipped_from, consumed],
            "lr_scale": lr_scale,
        }
        self.interventions = history + [event]
        trainer.metrics.write(event)
        trainer.log.warning(
            f"rollback: {reason}; restored {path}, skipped samples {skipped_from}..{consumed - 1}, "
            f"learning rate x{lr_scale:g}"
        )

    def state_dict(self) -> dict:
        return {
            "lr_scale": self.lr_scale,
            "interventions": list(self.interventions),
            "detector": self.detector.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.interventions = list(state["interventions"])
        self.detector.load_state_dict(state["detector"])
