"""The composition root: builds every component from the config and runs the training loop.

One optimizer step:
  1. the loader hands this DP rank its A micro-batches of (m, seq_len+1) tokens;
  2. inputs = tokens[:, :-1], targets = tokens[:, 1:] (padding masked to IGNORE_INDEX);
  3. each micro-batch's summed token loss is scaled by loss_scale / (valid tokens in the whole global
     batch) and back-propagated, so A micro-batches of m equal one batch of A*m exactly and the DP
     sum of gradients is the global mean;
  4. the optimizer reduces, unscales, skips on overflow, clips and applies AdamW at the schedule's lr.
"""

from __future__ import annotations

import math
import os
import time

import torch

from engine.checkpoint.manager import CheckpointManager
from engine.checkpoint.rng import capture_rng_state, restore_rng_state, seed_everything
from engine.config import TridentConfig, config_to_dict, resolve_batch
from engine.data.loader import StepLoader
from engine.log import RankLogger
from engine.metrics.flops import device_peak_tflops, mfu
from engine.metrics.writer import MetricsWriter, peak_memory_bytes
from engine.model.transformer import IGNORE_INDEX
from engine.optim.grad_sync import GradSync
from engine.optim.loss_scaler import build_loss_scaler
from engine.optim.lr_schedules import LRSchedule
from engine.training.assembly import (
    COMPUTE_DTYPES,
    build_datasets,
    build_model,
    build_optimizer,
    build_step_runner,
    load_tokenizer,
)
from engine.training.context import RunContext
from engine.training.rollback import RollbackGuard


class Trainer:
    def __init__(
        self,
        cfg: TridentConfig,
        ctx: RunContext,
        *,
        log: RankLogger | None = None,
        resume: bool | str | None = None,
        fresh: bool = False,
        grad_sync: GradSync | None = None,
    ) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.log = log or RankLogger(ctx.rank, ctx.world_size)
        self.batch = resolve_batch(cfg, ctx.dp_size)
        seed_everything(cfg.train.seed + 100 * ctx.pp_rank)
        self.model = build_model(cfg, ctx)
        if cfg.train.init_from_hf:
            from engine.hf.load import init_from_hf

            init_from_hf(self.model, cfg.train.init_from_hf, cfg)
        self.runner = build_step_runner(cfg, ctx, self.model)
        # The optimizer copies fp32 masters from the fp32 init before the model is cast down.
        self.optimizer = build_optimizer(cfg, ctx, self.model, grad_sync)
        self.model.to(COMPUTE_DTYPES[cfg.dtype_name])
        if hasattr(self.optimizer, "flatten_compute_params"):
            self.optimizer.flatten_compute_params()
        if cfg.train.cuda_graphs:
            from engine.model.graphs import GraphedModel, check_supported

            check_supported(cfg, ctx.device)
            self.runner.model = GraphedModel(self.model)  # captured on the first training micro-batch
        self.guard = RollbackGuard(cfg)
        self.scaler = build_loss_scaler(cfg.fp16, raise_at_floor=not self.guard.handles_scale_collapse)
        self.schedule = LRSchedule(cfg.scheduler, base_lr=cfg.optimizer.params.lr)
        self.tokenizer = load_tokenizer(cfg)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer is not None and self.tokenizer.pad_id >= 0 else None
        train_ds, self.valid_ds = build_datasets(cfg, ctx, self.batch, self.tokenizer)
        self.loader = StepLoader(
            train_ds,
            global_batch_size=self.batch.global_batch,
            micro_batch_size=self.batch.micro_batch,
            dp_rank=ctx.dp_rank,
            dp_size=ctx.dp_size,
        )
        self.step = 0
        self.skipped = 0
        self.history: list[dict] = []
        self.peak_tflops = cfg.train.peak_tflops or device_peak_tflops(
            torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None, cfg.dtype_name
        )
        self.checkpoints = CheckpointManager(cfg, ctx, log=self.log)
        start_from = self.checkpoints.resume_path(cfg.train.resume if resume is None else resume, fresh)
        if start_from is not None:
            self.load(start_from)
        self.metrics = MetricsWriter(
            cfg.train.log_dir,
            enabled=ctx.rank == 0,
            append=self.step > 0,
            tensorboard_dir=self._tensorboard_dir(),
            wandb=cfg.wandb,
            run_config=config_to_dict(cfg) if cfg.wandb.enabled else None,
        )

    # ------------------------------------------------------------------ setup

    def _tensorboard_dir(self) -> str | None:
        tb = self.cfg.tensorboard
        if not tb.enabled:
            return None
        return os.path.join(tb.output_path or self.cfg.train.log_dir, tb.job_name or "tensorboard")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "tp_rng": self.ctx.rng.state_dict() if self.ctx.rng is not None else None,
            "resilience": self.guard.state_dict(),
            "config": config_to_dict(self.cfg),
        }

    def save(self) -> str:
        """Checkpoint the current step on all ranks (see CheckpointManager.save); returns its directory."""
        return self.checkpoints.save(self.step, self.state_dict)

    def finalize_save(self) -> str | None:
        """Commit a checkpoint still being written in the background (all ranks); see CheckpointManager."""
        return self.checkpoints.finalize()

    def load(self, path: str) -> None:
        """Resume from checkpoint ``path`` (any layout): model and optimizer through the checkpoint manager,
        then the loop's own state."""
        state = self.checkpoints.load(path, model=self.model, optimizer=self.optimizer)
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])
        if self.ctx.rng is not None and state.get("tp_rng") is not None:
            self.ctx.rng.load_state_dict(state["tp_rng"])
        self.guard.load_state_dict(state["resilience"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self.log.info(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ steps

    def _split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(self.ctx.device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        if self.pad_id is not None:
            targets[targets == self.pad_id] = IGNORE_INDEX
        return inputs, targets

    def train_step(self) -> dict:
        self.model.train()
        batches = [self._split(t) for t in self.loader.next_step()]
        n_local = sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)
        n_tokens = self.ctx.dp_sum(torch.tensor(float(n_local), device=self.ctx.device)).item()
        scale = self.scaler.scale
        loss_total = self.runner.forward_backward(batches, loss_scale=scale, n_tokens=n_tokens)
        loss = (self.ctx.dp_sum(loss_total) / max(n_tokens, 1.0)).item()
        lr = self.schedule.lr_for_update(self.optimizer.applied_steps) * self.guard.lr_scale
        result = self.optimizer.step(lr=lr, loss_scale=scale)
        self.scaler.update(result.skipped)
        self.skipped += int(result.skipped)
        self.step += 1
        rec = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "loss_scale": scale,
            "skipped": self.skipped,
            "skipped_now": result.skipped,
            "tokens": int(n_tokens),
        }
        if self.ctx.counter is not None:
            rec["comm_bytes"] = self.ctx.counter.snapshot()
            self.ctx.counter.reset()
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.valid_ds is None:
            return None
        self.model.eval()
        loader = StepLoader(
            self.valid_ds,
            global_batch_size=self.batch.global_batch,
            micro_batch_size=self.batch.micro_batch,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size,
            prefetch=0,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for _ in range(self.cfg.train.eval_iters):
            if loader.consumed_samples + self.batch.global_batch > len(self.valid_ds):
                break
            batches = [self._split(t) for t in loader.next_step()]
            total[0] += self.runner.forward_only(batches)
            total[1] += sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)
        total = self.ctx.dp_sum(total)
        if total[1] == 0:
            return None
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        try:
            return self._fit()
        except BaseException:
            self.checkpoints.finalize_after_error()
            raise

    def _fit(self) -> dict:
        cfg, log = self.cfg, self.log
        max_steps, interval = cfg.train.max_steps, cfg.log_interval
        tokens_per_step = self.batch.global_batch * cfg.model.seq_len
        bar = self._progress_bar(max_steps)
        last_eval = None
        t_last, steps_since = time.perf_counter(), 0
        while self.step < max_steps:
            rec = self.train_step()
            steps_since += 1
            if self.guard.check(self, rec):
                t_last, steps_since = time.perf_counter(), 0
                continue
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                last_eval = self.evaluate()
            if self.step % interval == 0 or self.step == max_steps:
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize(self.ctx.device)
                elapsed = time.perf_counter() - t_last
                tps = steps_since * tokens_per_step / max(elapsed, 1e-9)
                tflops, util = mfu(tps / self.ctx.world_size, cfg.model, self.peak_tflops)
                rec.update(
                    tokens_per_s=tps,
                    tflops=tflops,
                    mfu=util,
                    peak_memory_bytes=peak_memory_bytes(self.ctx.device),
                    step_time_s=elapsed / steps_since,
                )
                if last_eval and cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                    rec.update(last_eval)
                self.metrics.write(rec)
                self.history.append(rec)
                t_last, steps_since = time.perf_counter(), 0
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
                bar.update(1)
            elif self.step % interval == 0:
                log.info(
                    f"step {self.step}/{max_steps} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
                    f"grad_norm {rec['grad_norm']:.3f}"
                )
            if cfg.train.save_dir and cfg.train.save_interval and self.step % cfg.train.save_interval == 0:
                self.save()
        if bar is not None:
            bar.close()
        if cfg.train.save_dir and not (cfg.train.save_interval and self.step % cfg.train.save_interval == 0):
            self.save()
        self.loader.close()
        final = self.evaluate()  # overlaps an async save's write
        self.finalize_save()
        self.metrics.close()
        return {
            "step": self.step,
            "loss": self.history[-1]["loss"] if self.history else None,
            "eval": final,
            "skipped": self.skipped,
        }

    def _progress_bar(self, total: int):
        if self.ctx.rank != 0 or not self.cfg.train.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
