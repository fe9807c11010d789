"""End to end: checkpoints written by real pipeline-parallel (pp=2) and ZeRO-3 (dp=2) runs export to
transformers models whose logits equal the single-device run's model after the same steps (<= 1e-4;
the layouts reproduce the single-device losses within 1e-5, so the weights agree to that order)."""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("transformers", reason="pip install transformers safetensors")

from engine.config import parse_config  # noqa: E402
from engine.hf.export import export  # noqa: E402
from tests.helpers import make_trainer  # noqa: E402
from tests.hf.hf_helpers import GPT2_MODEL, LLAMA_MODEL, hf_logits, raw_config, tokens, trident_logits  # noqa: E402
from tests.multiproc import run_ranks  # noqa: E402

VARIANTS = {  # name: (model, parallel, zero stage)
    "gpt2-pp2": (GPT2_MODEL, {"pipeline": 2}, 0),
    "llama-zero3": (LLAMA_MODEL, {}, 3),
}


def _raw(tmp: pathlib.Path, name: str, *, single: bool = False) -> dict:
    model, parallel, stage = VARIANTS[name]
    raw = raw_config(tmp / name, model)
    if not single:
        raw["parallel"] = parallel
        raw["zero_optimization"] = {"stage": stage}
    else:
        raw["train"]["save_dir"] = None
    return raw


def _worker(rank, world, args):
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    for raw in args:
        cfg = parse_config(raw)
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync).fit()


def test_pipeline_and_zero3_checkpoints_export(tmp_path):
    run_ranks(_worker, 2, args=[_raw(tmp_path, n) for n in VARIANTS], timeout_s=300)
    for name, (model, _, _) in VARIANTS.items():
        trainer = make_trainer(parse_config(_raw(tmp_path / "single", name, single=True)))
        trainer.fit()
        ids = tokens(model["vocab_size"])
        export(str(tmp_path / name / "ckpt"), str(tmp_path / name / "hf"))
        diff = (hf_logits(str(tmp_path / name / "hf"), ids) - trident_logits(trainer.model, ids)).abs().max()
        assert float(diff) <= 1e-4, name
