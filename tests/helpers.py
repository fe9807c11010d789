"""Tiny configs and in-process training runs shared by the core tests."""

from __future__ import annotations

import copy

import torch

from engine.config import parse_config
from engine.log import RankLogger
from engine.training.context import RunContext
from engine.training.trainer import Trainer

BASE = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 20, "warmup_num_steps": 3, "warmup_type": "linear"},
    },
    "gradient_clipping": 1.0,
    "model": {"arch": "gpt2", "n_layers": 2, "d_model": 32, "n_heads": 4, "seq_len": 16, "vocab_size": 96},
    "data": {"synthetic": True, "seed": 7},
    "train": {"max_steps": 6, "log_interval": 1, "progress": False},
}


def make_config(tmp_path, **sections):
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    raw["train"] = {**raw["train"], "log_dir": str(tmp_path / "run")}
    return parse_config(raw)


def make_trainer(cfg, **kwargs) -> Trainer:
    return Trainer(cfg, RunContext.single(torch.device("cpu")), log=RankLogger(0, 1), **kwargs)


def run_losses(cfg, **kwargs) -> list[float]:
    trainer = make_trainer(cfg, **kwargs)
    trainer.fit()
    return [r["loss"] for r in trainer.history]
