"""The reference every launcher must reproduce: the same config run in-process on 2 spawned ranks."""

from __future__ import annotations

import json

import pytest

from tests.distributed.launch_helpers import CONFIG
from tests.multiproc import run_ranks


def _reference_worker(rank, world, args):
    import pathlib
    import tempfile

    from engine.config import parse_config
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    raw = json.loads(pathlib.Path(args["config"]).read_text())
    raw["train"] = {**raw["train"], "log_dir": tempfile.mkdtemp(), "save_dir": None}
    cfg = parse_config(raw)
    ctx, sync = build_context(cfg, rank=rank, world_size=world)
    trainer = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
    trainer.fit()
    return [r["loss"] for r in trainer.history]


@pytest.fixture(scope="session")
def reference_losses() -> list[float]:
    """Per-step losses of configs/cpu/tiny-gpt2-tp2.json (tp=2), computed without any launcher."""
    losses = run_ranks(_reference_worker, 2, args={"config": str(CONFIG)}, timeout_s=300)
    assert losses[0] == losses[1]
    return losses[0]


@pytest.fixture(scope="session")
def single_device_losses(tmp_path_factory) -> list[float]:
    """The same model on one device (tp=1): parallelism must not change the math."""
    from engine.config import parse_config
    from tests.helpers import run_losses

    raw = json.loads(CONFIG.read_text())
    raw["parallel"] = {"tensor": 1}
    raw["train"] = {**raw["train"], "log_dir": str(tmp_path_factory.mktemp("single")), "save_dir": None}
    return run_losses(parse_config(raw))
