"""Checkpoint compatibility: tests/fixtures/ckpt_v1 was saved by an earlier commit (format version 1, see
tests/fixtures/make_ckpt_v1.py) together with the losses of its uninterrupted run. Today's code resumes it
bit-exactly: the losses and grad norms of the steps after the save equal the recorded ones exactly. New
checkpoints carry format version 2 (self-describing optimizer states); a version this code does not know
is refused by name. (Resharding the fixture into another layout: test_reliability_reshard.py.)"""

import json
import pathlib
import shutil

import pytest

from engine.checkpoint import store
from engine.errors import CheckpointError
from tests.helpers import make_config, make_trainer

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "ckpt_v1"


def _fixture_trainer(tmp_path):
    recorded = json.loads((FIXTURE / "losses.json").read_text())
    save_dir = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "ckpt", save_dir)
    raw = recorded["config"]
    cfg = make_config(
        tmp_path, **{k: v for k, v in raw.items() if k != "train"}, train={**raw["train"], "save_dir": str(save_dir)}
    )
    return make_trainer(cfg, resume=True), recorded, save_dir


def test_version_1_fixture_resumes_bit_exactly(tmp_path):
    trainer, recorded, save_dir = _fixture_trainer(tmp_path)
    at = recorded["save_at"]
    assert store.read_manifest(str(save_dir / f"step_{at:08d}"))["format_version"] == 1
    assert trainer.step == at and trainer.loader.consumed_samples == at * recorded["config"]["train_batch_size"]
    trainer.fit()
    assert [r["loss"] for r in trainer.history] == recorded["losses"][at:]
    assert [r["grad_norm"] for r in trainer.history] == recorded["grad_norms"][at:]
    # what it saved at the end is format 2, self-describing, and loads back on the fast path
    final = save_dir / f"step_{len(recorded['losses']):08d}"
    assert store.read_manifest(str(final))["format_version"] == store.FORMAT_VERSION == 2
    shard = store.load_shard(str(final), 0)
    layout = shard["optimizer"]["groups"][0]["layout"]
    assert set(layout) >= {"names", "shapes", "offsets", "tp"}
    assert layout["names"] == shard["optimizer"]["groups"][0]["names"]
    assert shard["optimizer"]["applied_steps"] == len(recorded["losses"])


def test_unknown_format_version_is_refused(tmp_path):
    step = tmp_path / "ckpt" / "step_00000003"
    shutil.copytree(FIXTURE / "ckpt" / "step_00000003", step)
    manifest = json.loads((step / "manifest.json").read_text())
    (step / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"format_version 99 is not one this Trident reads \(1, 2\)"):
        store.read_manifest(str(step))
