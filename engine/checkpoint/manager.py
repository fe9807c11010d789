"""Checkpoint orchestration for a run: when to resume, saving (in place or in the background), committing,
and loading this rank's model and optimizer from a checkpoint of any layout.

The components' state travels as one ``state_dict`` per rank (the trainer assembles it); this module knows
the directory protocol (engine/checkpoint/store.py), the background writer (async_save.py) and the two load
paths: the bit-exact per-rank shard when the layout is unchanged, else the layout-independent reshard
(reshard.py). Every method that touches several ranks is called by all of them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

import torch
from torch import nn

from engine.checkpoint import store
from engine.checkpoint.async_save import AsyncCheckpointWriter
from engine.checkpoint.compat import load_model_state
from engine.checkpoint.reshard import layout_key, load_resharded
from engine.config import TridentConfig
from engine.errors import CheckpointError, ConfigError
from engine.log import RankLogger


class CheckpointManager:
    """Saves and loads one rank's checkpoints under ``train.save_dir``.

    ``ctx`` is the run context (rank, world size, coordinates, ``barrier`` and ``all_ranks_true``)."""

    def __init__(self, cfg: TridentConfig, ctx, *, log: RankLogger) -> None:
        self.cfg, self.ctx, self.log = cfg, ctx, log
        self.save_dir = cfg.train.save_dir
        self.writer = AsyncCheckpointWriter(rank=ctx.rank) if cfg.train.async_save else None

    def layout(self) -> dict:
        """What a checkpoint records of the layout that wrote it (resharding compares these)."""
        par = self.cfg.parallel
        return {
            "dp": self.ctx.dp_size,
            "world_size": self.ctx.world_size,
            "tp": par.tensor,
            "pp": par.pipeline,
            "virtual_stages": par.virtual_stages,
            "zero_stage": self.cfg.zero_optimization.stage,
        }

    # ------------------------------------------------------------------ start

    def resume_path(self, resume: bool | str, fresh: bool) -> str | None:
        """The checkpoint to resume from, or None to start fresh. ``fresh`` deletes existing checkpoints;
        ``resume`` True needs one (exit code 4 without), ``"auto"`` takes one if present; starting over in a
        directory that holds checkpoints without either is refused."""
        exists = store.has_checkpoint(self.save_dir)
        if fresh:
            if exists and self.ctx.rank == 0:
                self.log.warning(f"--fresh: removing existing checkpoints in {self.save_dir}")
                shutil.rmtree(self.save_dir)
            self.ctx.barrier()
            return None
        if resume is True or (resume == "auto" and exists):
            if self.save_dir is None:
                raise ConfigError("train.save_dir: resuming needs a checkpoint directory")
            return store.latest_checkpoint(self.save_dir, warn=self.log.warning)
        if exists and not resume:
            raise ConfigError(
                f"train.save_dir: {self.save_dir} already holds checkpoints",
                hint="pass --resume to continue from them, or --fresh to start over",
            )
        return None

    # ------------------------------------------------------------------ save

    def save(self, step: int, state_dict: Callable[[], dict]) -> str:
        """Checkpoint ``step`` (all ranks); returns its directory. ``state_dict`` is called once, when the
        state is taken. With ``train.async_save`` the shards are written in the background and the checkpoint
        exists only once :meth:`finalize` committed it (the next save, the end of the run, a load or a
        rollback do)."""
        t0 = time.perf_counter()
        if self.writer is None:
            path = store.save_checkpoint(
                self.save_dir,
                step,
                state_dict(),
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                layout=self.layout(),
                keep_last=self.cfg.train.keep_last,
                barrier=self.ctx.barrier,
            )
            self.log.info(f"saved checkpoint {path} (written in {time.perf_counter() - t0:.2f} s)")
            self._after_commit(path)
            return path
        self.finalize()  # at most one save in flight
        t0 = time.perf_counter()
        snapshot = self.writer.snapshot(state_dict())
        tmp = store.prepare_save(self.save_dir, step, rank=self.ctx.rank, barrier=self.ctx.barrier)
        self.writer.start(tmp, snapshot, step=step, snapshot_s=time.perf_counter() - t0)
        return os.path.join(self.save_dir, store.step_dir_name(step))

    def finalize(self) -> str | None:
        """Commit the checkpoint being written in the background, if any: join this rank's writer, agree
        with the other ranks that every shard was written, then commit (barrier, rank 0 publishes ``latest``,
        barrier). All ranks, training thread. A writer's failure is raised here (CheckpointError naming the
        file) and the checkpoint is not committed. Returns the committed directory, else None."""
        result = self.writer.wait() if self.writer is not None else None
        if result is None:
            return None
        ok = self.ctx.all_ranks_true(result.error is None)
        if result.error is not None:
            raise result.error
        final = os.path.join(self.save_dir, store.step_dir_name(result.step))
        if not ok:
            raise CheckpointError(
                f"{final}: another rank failed writing its shard (its error names the file); checkpoint not committed"
            )
        path = store.commit_save(
            self.save_dir,
            result.step,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            layout=self.layout(),
            keep_last=self.cfg.train.keep_last,
            barrier=self.ctx.barrier,
        )
        waited = f"; waited {result.waited_s:.2f} s for the writer" if result.waited_s >= 0.01 else ""
        self.log.info(
            f"saved checkpoint {path} (snapshot {result.snapshot_s:.2f} s, written in background in "
            f"{result.write_s:.2f} s{waited})"
        )
        self._after_commit(path)
        return path

    def finalize_after_error(self) -> None:
        """On the way out of an exception: commit a background save only where that cannot hang (one process:
        the commit's barriers are no-ops). With several ranks the peers may never reach the commit's
        collectives, so the save is left uncommitted and ``latest`` stays at the previous checkpoint."""
        step = self.writer.pending_step if self.writer is not None else None
        if step is None:
            return
        if self.ctx.world_size == 1:
            try:
                self.finalize()
            except Exception as err:  # noqa: BLE001 - the original error is the one that propagates
                self.log.warning(f"checkpoint of step {step} not committed: {err}")
            return
        self.writer.wait()  # local file I/O only: it finishes, and nothing writes behind a later save's back
        self.log.warning(
            f"checkpoint of step {step} left uncommitted after the error (needs every rank); "
            "latest stays at the previous checkpoint"
        )

    def _after_commit(self, path: str) -> None:
        """DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``: beside a committed ZeRO-3 checkpoint,
        rank 0 writes the whole model gathered from every shard, in the compute dtype, as
        ``model_16bit.safetensors`` (tensor names as in the single-device model)."""
        zero = self.cfg.zero_optimization
        if not (zero.stage == 3 and zero.stage3_gather_16bit_weights_on_model_save):
            return
        if self.ctx.rank == 0:
            from engine.checkpoint.consolidate import write_16bit_model  # noqa: PLC0415 - only with the option

            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.dtype_name]
            written = write_16bit_model(path, dtype=dtype)
            self.log.info(f"wrote the gathered {self.cfg.dtype_name} model {written}")
        self.ctx.barrier()

    # ------------------------------------------------------------------ load

    def _own_shard_if_it_fits(self, path: str, manifest: dict, optimizer) -> dict | None:
        """This rank's shard when every rank can load its own shard as is (same layout and buckets), else
        None on every rank (decided together: the resharding path has collectives)."""
        state = None
        saved = dict(manifest["layout"])
        if layout_key(saved) == layout_key(self.layout()):
            state = store.load_shard(path, self.ctx.rank)
            if "virtual_stages" not in saved:  # format 1 did not record it in the manifest
                saved["virtual_stages"] = state.get("config", {}).get("parallel", {}).get("virtual_stages", 1)
            if layout_key(saved) != layout_key(self.layout()) or not optimizer.can_load(state["optimizer"]):
                state = None
        return state if self.ctx.all_ranks_true(state is not None) else None

    def load(self, path: str, *, model: nn.Module, optimizer) -> dict:
        """Load ``model`` and ``optimizer`` of this rank from checkpoint ``path``: per rank, bit-exactly, when
        it was saved with this layout; otherwise through the layout-independent state (reshard.py). Returns
        the rest of the rank's state (step, scaler, loader, RNG, ...) for the caller to restore. With
        ``zero_optimization.load_from_fp32_weights: false`` the fp32 masters are then re-derived from the
        compute-dtype weights (DeepSpeed's meaning: the rounding of a 16-bit model is kept)."""
        self.finalize()  # a background save in flight is committed (or fails) before anything is read
        manifest = store.read_manifest(path)
        state = self._own_shard_if_it_fits(path, manifest, optimizer)
        if state is not None:
            load_model_state(model, state["model"], path=path)
            optimizer.load_state_dict(state["optimizer"])
        else:
            self.log.info(f"{path}: saved with layout {manifest['layout']}, resharding into {self.layout()}")
            state = load_resharded(path, cfg=self.cfg, ctx=self.ctx, optimizer=optimizer)
        if not self.cfg.zero_optimization.load_from_fp32_weights:
            optimizer.masters_from_params()
        return state
