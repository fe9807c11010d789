"""DeepSpeed's checkpoint options under zero_optimization, with DeepSpeed's meaning:

* ``load_from_fp32_weights`` (default true): resume takes the fp32 master weights from the checkpoint;
  false re-derives them from the checkpoint's bf16 model weights, so the masters carry bf16 rounding;
* ``stage3_gather_16bit_weights_on_model_save``: with ZeRO-3, each checkpoint directory also holds the whole
  model gathered from the shards in the compute dtype (``model_16bit.safetensors``), here on 2 DP ranks.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import store
from engine.checkpoint.consolidate import CONSOLIDATED_NAME
from engine.checkpoint.gather import gather_full_state
from tests.helpers import make_config, make_trainer
from tests.multiproc import run_ranks


def _masters(trainer) -> torch.Tensor:
    opt = trainer.optimizer
    parts = [g.master for g in opt.groups] if hasattr(opt, "groups") else [b.master for b in opt.buckets]
    return torch.cat([p.clone() for p in parts])


@pytest.mark.parametrize("stage", [0, 1])
def test_load_from_fp32_weights(tmp_path, stage):
    train = {"max_steps": 3, "log_interval": 1, "progress": False, "save_dir": str(tmp_path / "ckpt")}
    zero = {"stage": stage}
    first = make_trainer(make_config(tmp_path, bf16={"enabled": True}, train=train, zero_optimization=zero))
    first.fit()
    saved = _masters(first)
    rounded = saved.to(torch.bfloat16).float()
    assert not torch.equal(saved, rounded)  # the masters hold more than bf16 can

    exact = make_trainer(
        make_config(tmp_path, bf16={"enabled": True}, train=train, zero_optimization=zero), resume=True
    )
    torch.testing.assert_close(_masters(exact), saved, rtol=0, atol=0)
    lossy = make_trainer(
        make_config(
            tmp_path, bf16={"enabled": True}, train=train, zero_optimization={**zero, "load_from_fp32_weights": False}
        ),
        resume=True,
    )
    torch.testing.assert_close(_masters(lossy), rounded, rtol=0, atol=0)


def _zero3_worker(rank, world_size, args):
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    cfg = make_config(
        args["tmp"],
        bf16={"enabled": True},
        train={"max_steps": 2, "log_interval": 1, "progress": False, "save_dir": args["ckpt"]},
        zero_optimization={
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": args["gather"],
        },
    )
    ctx, sync = build_context(cfg, rank=rank, world_size=world_size)
    Trainer(cfg, ctx, log=RankLogger(rank, world_size), grad_sync=sync).fit()
    return None


def test_stage3_gathers_the_16bit_model_on_save(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_ranks(_zero3_worker, 2, args={"tmp": tmp_path, "ckpt": str(ckpt), "gather": True})
    path = store.latest_checkpoint(str(ckpt))
    saved = load_file(f"{path}/{CONSOLIDATED_NAME}")
    full, _ = gather_full_state(path)
    assert set(saved) == set(full)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, full[name].to(torch.bfloat16), rtol=0, atol=0)
    assert saved["layers.0.attn.qkv.weight"].shape == (3 * 32, 32)  # whole, not a DP shard

    other = tmp_path / "other"
    run_ranks(_zero3_worker, 2, args={"tmp": tmp_path, "ckpt": str(other), "gather": False})
    assert not list(other.rglob(CONSOLIDATED_NAME))
