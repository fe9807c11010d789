"""Training-loop properties on one CPU process: accumulation, overflow skip, bit-exact resume, precisions."""

import json

import pytest
import torch

from engine.errors import ConfigError, NoCheckpointError
from tests.helpers import make_config, make_trainer


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_accumulation_equals_one_big_micro_batch(tmp_path):
    # 4 micro-batches of 2 == 1 micro-batch of 8: same global batch, same token-mean loss and update.
    a = make_trainer(make_config(tmp_path / "a", train_micro_batch_size_per_gpu=2))
    b = make_trainer(make_config(tmp_path / "b", train_micro_batch_size_per_gpu=8))
    assert (a.batch.grad_accum, b.batch.grad_accum) == (4, 1)
    for _ in range(4):
        ra, rb = a.train_step(), b.train_step()
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    for pa, pb in zip(_params(a), _params(b)):
        assert torch.allclose(pa, pb, rtol=1e-6, atol=1e-6)


def test_fp16_overflow_step_is_skipped_and_leaves_state_untouched(tmp_path):
    cfg = make_config(tmp_path, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    trainer = make_trainer(cfg)
    trainer.train_step()
    forward = trainer.model.forward
    trainer.model.forward = lambda ids, targets: forward(ids, targets) * float("inf")
    weights = _params(trainer)
    opt = trainer.optimizer.state_dict()
    rec = trainer.train_step()
    trainer.model.forward = forward
    assert rec["skipped"] == 1 and rec["loss_scale"] == 256.0 and trainer.scaler.scale == 128.0
    for before, after in zip(weights, _params(trainer)):
        assert torch.equal(before, after)
    for g_before, g_after in zip(opt["groups"], trainer.optimizer.state_dict()["groups"]):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(g_before[key], g_after[key])
    assert trainer.optimizer.applied_steps == 1  # bias correction and the LR schedule did not advance
    rec = trainer.train_step()
    assert rec["skipped"] == 1 and rec["loss_scale"] == 128.0 and trainer.optimizer.applied_steps == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(tmp_path, precision):
    ref = make_trainer(make_config(tmp_path / "fp32"))
    init = _params(ref)
    ref.fit()
    got = make_trainer(make_config(tmp_path / precision, **{precision: {"enabled": True}}))
    got.fit()
    ref_losses, losses = [r["loss"] for r in ref.history], [r["loss"] for r in got.history]
    assert all(abs(a - b) / a < 0.02 for a, b in zip(ref_losses, losses))
    assert losses != ref_losses  # it really ran in reduced precision
    # The compute copy follows the fp32 masters: the same updates up to reduced-precision noise (compared
    # over the whole model: Adam amplifies noise where gradients are ~0, e.g. the key bias).
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(p.dtype == dtype for p in got.model.parameters())
    u32 = torch.cat([(p32 - p0).flatten() for p0, p32 in zip(init, _params(ref))])
    u16 = torch.cat([(p16.float() - p0).flatten() for p0, p16 in zip(init, _params(got))])
    assert (u16 - u32).norm() <= 0.1 * u32.norm()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resume_is_bit_exact(tmp_path, arch):
    common = dict(
        model={"arch": arch},
        train={
            "max_steps": 6,
            "log_interval": 1,
            "progress": False,
            "save_interval": 3,
            "save_dir": str(tmp_path / "ckpt"),
        },
    )
    straight = make_trainer(
        make_config(
            tmp_path / "straight",
            **{**common, "train": {**common["train"], "save_dir": str(tmp_path / "ckpt_straight")}},
        )
    )
    straight.fit()
    first = make_trainer(make_config(tmp_path / "first", **{**common, "train": {**common["train"], "max_steps": 3}}))
    first.fit()
    second = make_trainer(make_config(tmp_path / "first", **common), resume=True)
    assert second.step == 3
    second.fit()
    assert [r["loss"] for r in second.history] == [r["loss"] for r in straight.history[3:]]
    assert [r["grad_norm"] for r in second.history] == [r["grad_norm"] for r in straight.history[3:]]
    for a, b in zip(_params(straight), _params(second)):
        assert torch.equal(a, b)
    lines = (tmp_path / "first" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_no_silent_fresh_start_and_no_checkpoint(tmp_path):
    train = {"max_steps": 2, "log_interval": 1, "progress": False, "save_dir": str(tmp_path / "ckpt")}
    with pytest.raises(NoCheckpointError, match="no complete checkpoint to resume from"):
        make_trainer(make_config(tmp_path, train=train), resume=True)
    make_trainer(make_config(tmp_path, train=train)).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        make_trainer(make_config(tmp_path, train=train))
    assert make_trainer(make_config(tmp_path, train=train), fresh=True).step == 0
    assert make_trainer(make_config(tmp_path, train={**train, "resume": "auto"})).step == 0  # fresh removed them


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, capsys):
    train = {
        "max_steps": 4,
        "log_interval": 1,
        "progress": False,
        "save_dir": str(tmp_path / "ckpt"),
        "save_interval": 2,
    }
    make_trainer(make_config(tmp_path, train=train)).fit()
    shard = tmp_path / "ckpt" / "step_00000004" / "rank_00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = make_trainer(make_config(tmp_path, train=train), resume=True)
    assert resumed.step == 2
    assert f"skipping checkpoint {shard.parent}: {shard} fails its SHA-256 check" in capsys.readouterr().err
