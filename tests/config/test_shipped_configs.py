"""Every config under configs/ loads and plans (python -m engine.plan, in-process) for the GPU count its
file name states, and the CPU configs train (checked by tests/distributed/test_launchers.py)."""

from __future__ import annotations

import pathlib

import pytest

from engine.config import load_config, resolve_batch
from engine.plan import main as plan_main

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*/*.json"))
MODELS = ["gpt2-124m", "gpt2-350m", "gpt2-760m", "gpt2-1.3b", "llama-1b", "llama-7b"]


def world_size(path: pathlib.Path, cfg) -> int:
    """The GPU count of the file name (8gpu.json), else the smallest world the layout needs (CPU configs)."""
    if path.stem.endswith("gpu"):
        return int(path.stem.removesuffix("gpu"))
    return cfg.parallel.tensor * cfg.parallel.pipeline


def test_every_model_has_1_8_64_gpu_layouts():
    for model in MODELS:
        assert {p.name for p in (CONFIGS / model).glob("*.json")} == {"1gpu.json", "8gpu.json", "64gpu.json"}
    assert len(list((CONFIGS / "cpu").glob("*.json"))) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_plans(path, capsys):
    cfg = load_config(str(path))
    world = world_size(path, cfg)
    par = cfg.parallel
    assert world % (par.tensor * par.pipeline) == 0
    batch = resolve_batch(cfg, world // (par.tensor * par.pipeline))
    assert batch.global_batch == cfg.train_batch_size
    assert plan_main(["--config", str(path), "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    assert f"world {world} = dp {batch.dp} x tp {par.tensor} x pp {par.pipeline}" in out
    assert "<- configured" in out
