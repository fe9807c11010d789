"""Asynchronous checkpoint saving (``train.async_save``): the training thread takes a host snapshot, a writer
thread writes the shard, the training thread commits at the next save point. Checked: the snapshot
serializes exactly like the live state and later steps cannot change it; async checkpoints load like sync
ones and resume bit-exactly; a crash or error before the commit leaves ``latest`` at the previous complete
checkpoint; a failing writer surfaces as CheckpointError naming the file, with nothing committed; rollback
sees a checkpoint still in flight once committed; two gloo ranks commit both shards and agree on failures."""

import copy
import io
import json
import os
import pathlib
import threading

import numpy as np
import pytest
import torch

from engine.checkpoint import store
from engine.checkpoint.snapshot import HostSnapshot
from engine.errors import CheckpointError
from tests.helpers import make_config, make_trainer
from tests.multiproc import run_ranks

ENOSPC = OSError(28, "No space left on device")


def _train(save_dir, *, steps=6, interval=3, async_save=True, **extra):
    return {
        "max_steps": steps,
        "log_interval": 1,
        "progress": False,
        "save_dir": str(save_dir),
        "save_interval": interval,
        "async_save": async_save,
        **extra,
    }


def _same(a, b, path="state") -> None:
    """Equal structure, tensors equal in dtype, shape and every bit, everything else equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _without_config(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "config"}  # holds save_dir / async_save, which differ


def _latest(save_dir) -> str:
    return (pathlib.Path(save_dir) / "latest").read_text().strip()


def _serialized(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _HeldWriter:
    """Holds every background shard write until ``release()`` (patches store.write_shard, which the writer
    thread calls)."""

    def __init__(self, monkeypatch) -> None:
        self.go, self.entered = threading.Event(), threading.Event()
        write = store.write_shard

        def held(tmp, state, *, rank):
            self.entered.set()
            assert self.go.wait(60), "writer was never released"
            return write(tmp, state, rank=rank)

        monkeypatch.setattr(store, "write_shard", held)

    def release(self) -> None:
        self.go.set()


def test_snapshot_serializes_like_the_live_state_and_is_a_copy(tmp_path):
    trainer = make_trainer(make_config(tmp_path))  # gpt2: tied embeddings share a storage
    trainer.train_step()
    live = trainer.state_dict()
    snap = HostSnapshot().take(live)
    # The same bytes: same storages shared by the same views, same non-tensor objects.
    assert _serialized(snap) == _serialized(live)
    for key, tensor in live["model"].items():
        assert snap["model"][key].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr(), key
    shared = {t.untyped_storage().data_ptr() for t in snap["model"].values()}
    assert len(shared) == len({t.untyped_storage().data_ptr() for t in live["model"].values()})
    assert snap["rng"]["numpy"][1] is not live["rng"]["numpy"][1]  # non-tensor leaves are copies too


def test_snapshot_reuses_its_buffers(tmp_path):
    trainer = make_trainer(make_config(tmp_path))
    snapshots = HostSnapshot()
    first = snapshots.take(trainer.state_dict())
    ptrs = {k: t.untyped_storage().data_ptr() for k, t in first["model"].items()}
    trainer.train_step()
    live = trainer.state_dict()
    second = snapshots.take(live)  # the same storage sizes: written into the same buffers
    assert {k: t.untyped_storage().data_ptr() for k, t in second["model"].items()} == ptrs
    assert _serialized(second) == _serialized(live)


def test_async_checkpoints_equal_sync_ones_and_resume_bit_exact(tmp_path, capsys):
    sync = make_trainer(make_config(tmp_path / "sync", train=_train(tmp_path / "ckpt_sync", async_save=False)))
    sync.fit()
    capsys.readouterr()
    straight = make_trainer(make_config(tmp_path / "async", train=_train(tmp_path / "ckpt_async")))
    straight.fit()
    err = capsys.readouterr().err
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in sync.history]
    for step in (3, 6):
        name = store.step_dir_name(step)
        a, s = tmp_path / "ckpt_async" / name, tmp_path / "ckpt_sync" / name
        assert store.verify_checkpoint(str(a)) is None
        assert json.loads((a / "manifest.json").read_text())["shards"].keys() == {"rank_00000.pt"}
        _same(_without_config(store.load_shard(str(a), 0)), _without_config(store.load_shard(str(s), 0)))
        assert f"saved checkpoint {a} (snapshot " in err and "s, written in background in " in err
    assert _latest(tmp_path / "ckpt_async") == "step_00000006"
    assert not [p for p in os.listdir(tmp_path / "ckpt_async") if p.startswith(".tmp_")]
    # Stop at 3 (the end-of-run save is async too) and resume: the losses and weights of the straight run.
    first = make_trainer(make_config(tmp_path / "first", train=_train(tmp_path / "ckpt", steps=3)))
    first.fit()
    second = make_trainer(make_config(tmp_path / "first", train=_train(tmp_path / "ckpt")), resume=True)
    assert second.step == 3
    second.fit()
    assert [(r["loss"], r["grad_norm"]) for r in second.history] == [
        (r["loss"], r["grad_norm"]) for r in straight.history[3:]
    ]
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_snapshot_is_isolated_from_later_steps(tmp_path, monkeypatch):
    held = _HeldWriter(monkeypatch)
    trainer = make_trainer(make_config(tmp_path, train=_train(tmp_path / "ckpt")))
    trainer.train_step()
    trainer.train_step()
    expected = copy.deepcopy(trainer.state_dict())  # (tensors' __deepcopy__ clones them)
    trainer.save()
    assert held.entered.wait(30)
    for _ in range(2):  # the live model, optimizer, loader and RNG move on while the write is held
        trainer.train_step()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    assert not (tmp_path / "ckpt" / "step_00000002").exists() and not (tmp_path / "ckpt" / "latest").exists()
    held.release()
    assert trainer.finalize_save() == str(tmp_path / "ckpt" / "step_00000002")
    _same(store.load_shard(str(tmp_path / "ckpt" / "step_00000002"), 0), expected)
    assert _latest(tmp_path / "ckpt") == "step_00000002"


def test_crash_before_commit_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    trainer = make_trainer(make_config(tmp_path, train=_train(ckpt, interval=2)))
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    trainer.save()
    losses += [trainer.train_step()["loss"] for _ in range(2)]
    held = _HeldWriter(monkeypatch)
    trainer.save()  # commits step 2, then the step-4 write is held: the process "dies" here
    assert held.entered.wait(30)
    assert _latest(ckpt) == "step_00000002" and not (ckpt / "step_00000004").exists()
    held.release()
    trainer.checkpoints.writer.wait()  # the shard reaches the disk, but nobody commits it
    assert (ckpt / ".tmp_step_00000004" / "rank_00000.pt").exists()
    assert not (ckpt / ".tmp_step_00000004" / "manifest.json").exists()
    del trainer
    monkeypatch.undo()
    resumed = make_trainer(make_config(tmp_path, train=_train(ckpt, interval=2, steps=4)), resume=True)
    assert resumed.step == 2
    (ckpt / ".tmp_step_00000001").mkdir()  # an older crash's leftover: removed by the next commit
    resumed.fit()
    assert [r["loss"] for r in resumed.history] == losses[2:]
    assert _latest(ckpt) == "step_00000004" and store.verify_checkpoint(str(ckpt / "step_00000004")) is None
    assert not [p for p in os.listdir(ckpt) if p.startswith(".tmp_")]


def _fail_at_step(trainer, step: int, message: str) -> None:
    """Make the trainer's forward raise RuntimeError(message) when it computes step ``step``."""
    forward = trainer.model.forward

    def broken(ids, targets):
        if trainer.step + 1 == step:
            raise RuntimeError(message)
        return forward(ids, targets)

    trainer.model.forward = broken


def test_error_in_one_process_commits_the_save_in_flight(tmp_path):
    # One process: the commit's barriers cannot hang, so the consistent step-4 snapshot is kept.
    trainer = make_trainer(make_config(tmp_path, train=_train(tmp_path / "ckpt", interval=2)))
    _fail_at_step(trainer, 5, "boom at step 5")
    with pytest.raises(RuntimeError, match="boom at step 5"):
        trainer.fit()
    assert _latest(tmp_path / "ckpt") == "step_00000004"
    assert store.verify_checkpoint(str(tmp_path / "ckpt" / "step_00000004")) is None


def test_failing_writer_raises_checkpoint_error_naming_the_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "step_00000004" in str(getattr(f, "name", "")):
            raise ENOSPC
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    trainer = make_trainer(make_config(tmp_path, train=_train(ckpt, steps=4, interval=2)))
    with pytest.raises(CheckpointError) as err:
        trainer.fit()  # the step-4 write fails in the background; the end of fit() commits, and raises
    shard = ckpt / ".tmp_step_00000004" / "rank_00000.pt"
    assert str(err.value).startswith(f"{shard}: writing the checkpoint failed (No space left on device)")
    assert "\n" not in str(err.value)
    assert _latest(ckpt) == "step_00000002"
    assert not (ckpt / "step_00000004").exists()
    assert not (ckpt / ".tmp_step_00000004" / "manifest.json").exists()
    assert trainer.checkpoints.writer.pending_step is None  # raised once, not again
    assert trainer.finalize_save() is None


def test_rollback_sees_the_checkpoint_in_flight(tmp_path):
    # NaN at step 6: the step-4 save is still being written when the guard looks for a checkpoint before
    # step 6; it is committed first, so the rollback restores step 4 (not step 2), as with sync saves.
    cfg = make_config(
        tmp_path, train=_train(tmp_path / "ckpt", steps=8, interval=2), resilience={"rollback": {"enabled": True}}
    )
    trainer = make_trainer(cfg)
    forward = trainer.model.forward

    def injected(ids, targets):
        loss = forward(ids, targets)
        return loss * float("nan") if trainer.step + 1 == 6 and not trainer.guard.interventions else loss

    trainer.model.forward = injected
    trainer.fit()
    (event,) = trainer.guard.interventions
    assert event["restored"] == str(tmp_path / "ckpt" / "step_00000004")
    assert trainer.step == 8 and _latest(tmp_path / "ckpt") == "step_00000008"


# ---------------------------------------------------------------- two gloo ranks


def _two_rank_worker(rank, world, args):
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    root = pathlib.Path(args["tmp"])

    def trainer(name, **train):
        cfg = make_config(
            root / name / f"log{rank}", zero_optimization={"stage": 1}, train=_train(root / name / "ckpt", **train)
        )
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        return Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)

    out = {}
    # async and sync saves of the same run: both shards committed, equal to the sync ones
    for name, async_save in (("sync", False), ("async", True)):
        t = trainer(name, steps=4, interval=2, async_save=async_save)
        t.fit()
        out[name] = [r["loss"] for r in t.history]
    for step in (2, 4):
        path = root / "async" / "ckpt" / store.step_dir_name(step)
        manifest = json.loads((path / "manifest.json").read_text())
        out[f"shards{step}"] = sorted(manifest["shards"])
        out[f"verify{step}"] = store.verify_checkpoint(str(path))
        _same(
            _without_config(store.load_shard(str(path), rank)),
            _without_config(store.load_shard(str(root / "sync" / "ckpt" / store.step_dir_name(step)), rank)),
        )
    out["latest"] = _latest(root / "async" / "ckpt")
    # rank 1's disk is full at step 4: both ranks raise, nothing is committed
    save = torch.save

    def disk_full(obj, f, *a, **kw):
        if rank == 1 and "step_00000004" in str(getattr(f, "name", "")):
            raise ENOSPC
        return save(obj, f, *a, **kw)

    torch.save = disk_full
    try:
        t = trainer("fail", steps=4, interval=2)
        try:
            t.fit()
        except CheckpointError as err:
            out["fail_error"] = str(err)
    finally:
        torch.save = save
    out["fail_latest"] = _latest(root / "fail" / "ckpt")
    out["fail_step4"] = (root / "fail" / "ckpt" / "step_00000004").exists()
    # an error on every rank at step 5 while step 4 is in flight: left uncommitted (the commit needs every
    # rank), latest stays at step 2, and a resumed run continues from there
    t = trainer("crash", steps=6, interval=2)
    _fail_at_step(t, 5, "boom")
    try:
        t.fit()
    except RuntimeError:
        pass
    out["crash_latest"] = _latest(root / "crash" / "ckpt")
    resumed = trainer("crash", steps=4, interval=2, resume=True)
    out["resumed_at"] = resumed.step
    resumed.fit()
    out["resumed"] = [r["loss"] for r in resumed.history]
    out["resumed_latest"] = _latest(root / "crash" / "ckpt")
    return out


def test_two_ranks_commit_both_shards_and_agree_on_failure(tmp_path):
    results = run_ranks(_two_rank_worker, 2, args={"tmp": str(tmp_path)}, timeout_s=300)
    for res in results:
        assert res["async"] == res["sync"]
        for step in (2, 4):
            assert res[f"shards{step}"] == ["rank_00000.pt", "rank_00001.pt"] and res[f"verify{step}"] is None
        assert res["latest"] == "step_00000004"
        assert res["fail_latest"] == "step_00000002" and not res["fail_step4"]
        assert res["crash_latest"] == "step_00000002"
        assert res["resumed_at"] == 2 and res["resumed"] == res["async"][2:]
        assert res["resumed_latest"] == "step_00000004"
    shard = tmp_path / "fail" / "ckpt" / ".tmp_step_00000004" / "rank_00001.pt"
    assert results[1]["fail_error"].startswith(f"{shard}: writing the checkpoint failed (No space left on device)")
    assert results[0]["fail_error"].startswith(
        f"{tmp_path / 'fail' / 'ckpt' / 'step_00000004'}: another rank failed writing its shard"
    )
