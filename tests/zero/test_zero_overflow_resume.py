"""ZeRO fp16: an overflow on one rank makes every rank skip the same step (the flag travels in the
all-reduced squared norm). ZeRO checkpoints are sharded per rank and resume bit-exactly on the same layout."""

import pathlib
import tempfile

import torch

from tests.multiproc import run_ranks
from tests.zero.zero_helpers import zero_config

OVERFLOW_STEPS = (2, 4)  # injected on rank 0 only


def _worker(rank, world, args):
    from engine.checkpoint import store
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    out = {}
    for stage in (1, 2, 3):
        # fp16 with an overflow injected into rank 0's forward at some steps.
        cfg = zero_config(
            pathlib.Path(tempfile.mkdtemp()),
            stage=stage,
            steps=5,
            fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
        )
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        trainer = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
        forward = trainer.model.forward
        skipped = []
        for step in range(5):
            if rank == 0 and step in OVERFLOW_STEPS:
                trainer.model.forward = lambda ids, targets, f=forward: f(ids, targets) * float("inf")
            before = trainer.skipped
            trainer.train_step()
            trainer.model.forward = forward
            skipped.append(trainer.skipped - before)
        out[("fp16", stage)] = {
            "skipped": skipped,
            "applied": trainer.optimizer.applied_steps,
            "scale": trainer.scaler.scale,
        }
        # Resume: save at step 3 of 6, reload the step-3 checkpoint in a fresh trainer, finish.
        tmp = pathlib.Path(args["tmp"]) / f"stage{stage}"  # shared by the ranks: one checkpoint directory
        save = str(tmp / "ckpt")
        train = {"save_dir": save, "save_interval": 3}
        cfg = zero_config(tmp, stage=stage, steps=6, bf16={"enabled": True}, train=train)
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        straight = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
        straight.fit()
        cfg2 = zero_config(
            tmp / "b", stage=stage, steps=6, bf16={"enabled": True}, train={"save_dir": str(tmp / "ckpt_b")}
        )
        ctx, sync = build_context(cfg2, rank=rank, world_size=world)
        resumed = Trainer(cfg2, ctx, log=RankLogger(rank, world), grad_sync=sync)
        resumed.load(str(pathlib.Path(save) / "step_00000003"))
        resumed.fit()
        shard = store.load_shard(str(pathlib.Path(save) / "step_00000003"), rank)
        out[("resume", stage)] = {
            "straight": [(r["loss"], r["grad_norm"]) for r in straight.history[3:]],
            "resumed": [(r["loss"], r["grad_norm"]) for r in resumed.history],
            "same_params": all(
                torch.equal(a, b)
                for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values())
            ),
            "model_shapes": {k: tuple(v.shape) for k, v in shard["model"].items()},
            "full_shapes": {k: tuple(v.shape) for k, v in straight.model.state_dict().items()},
            "opt_numel": sum(b["master"].numel() for b in shard["optimizer"]["buckets"]),
        }
    return out


def test_fp16_overflow_skips_together_and_resume_is_bit_exact(tmp_path):
    results = run_ranks(_worker, 2, args={"tmp": str(tmp_path)}, timeout_s=600)
    for stage in (1, 2, 3):
        for rank in range(2):
            got = results[rank][("fp16", stage)]
            assert got["skipped"] == [1 if s in OVERFLOW_STEPS else 0 for s in range(5)], (stage, rank)
            assert got["applied"] == 3 and got["scale"] == 64.0
            res = results[rank][("resume", stage)]
            assert res["resumed"] == res["straight"] and len(res["resumed"]) == 3, (stage, rank)
            assert res["same_params"]
            # the model entry holds this rank's full (TP/PP) shard; the optimizer entry only its DP shard
            assert res["model_shapes"] == res["full_shapes"]
        assert results[0][("resume", stage)]["opt_numel"] == results[1][("resume", stage)]["opt_numel"]
