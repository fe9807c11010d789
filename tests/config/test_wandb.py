"""DeepSpeed's wandb section: rank 0 logs every metrics.jsonl scalar to the configured project/group/team,
and resumes the same run id after a restart. A stand-in wandb module records the calls (no network)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest

from engine.config import parse_config
from engine.errors import ConfigError
from engine.metrics.writer import MetricsWriter


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged = []
        self.finished = False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.runs = []
    mod.util = types.SimpleNamespace(generate_id=lambda: f"run{len(mod.runs)}")

    def init(**kwargs):
        mod.runs.append(FakeRun(**kwargs))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_metrics_reach_wandb_with_deepspeed_keys(tmp_path, fake_wandb):
    cfg = parse_config({"train_batch_size": 8, "wandb": {"enabled": True, "project": "p", "group": "g", "team": "t"}})
    for _ in range(2):  # a restart resumes the same run id
        writer = MetricsWriter(str(tmp_path), enabled=True, wandb=cfg.wandb, run_config={"x": 1})
        writer.write({"step": 3, "loss": 2.5, "lr": 1e-3, "skipped": 0, "comm_bytes": {"dp": 8, "tp": 4}})
        writer.close()
    first, second = fake_wandb.runs
    assert first.init == {
        "project": "p",
        "group": "g",
        "entity": "t",
        "dir": str(tmp_path),
        "id": "run0",
        "resume": "allow",
        "config": {"x": 1},
    }
    assert second.init["id"] == "run0"
    assert first.logged == [(3, {"loss": 2.5, "lr": 1e-3, "skipped": 0, "comm_bytes/dp": 8, "comm_bytes/tp": 4})]
    assert first.finished


def test_other_ranks_never_start_a_run(tmp_path, fake_wandb):
    cfg = parse_config({"train_batch_size": 8, "wandb": {"enabled": True}})
    MetricsWriter(str(tmp_path), enabled=False, wandb=cfg.wandb).close()
    assert fake_wandb.runs == []


def test_enabled_without_the_package_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        parse_config({"train_batch_size": 8, "wandb": {"enabled": True}})
    assert str(err.value) == (
        "wandb.enabled: true but the wandb package is not installed (hint: pip install "
        "wandb, or set wandb.enabled=false)"
    )
