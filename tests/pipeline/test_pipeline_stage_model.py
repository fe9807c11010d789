"""Stage models start with exactly the single-device weights; bad layouts are refused at setup with numbers;
evaluation streams are valid pipelines. No processes."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch

from engine.errors import ConfigError
from engine.model.transformer import Transformer
from engine.pipeline.schedules import Forward, build_forward_only
from engine.pipeline.simulate import simulate
from engine.pipeline.stage_model import build_stage_model, check_pipeline_layout
from engine.training.context import RunContext
from tests.helpers import make_config


def _stage_ctx(stage: int) -> RunContext:
    return RunContext(rank=stage, world_size=1, device=torch.device("cpu"), pp_rank=stage)


@pytest.mark.parametrize(
    ("arch", "pp", "virtual", "layers"), [("gpt2", 2, 1, 3), ("llama", 2, 2, 4), ("gpt2", 3, 2, 7)]
)
def test_stages_hold_the_single_device_weights(tmp_path, arch, pp, virtual, layers):
    cfg = make_config(
        tmp_path,
        model={"arch": arch, "n_layers": layers, "tie_embeddings": arch == "gpt2"},
        parallel={
            "pipeline": pp,
            "virtual_stages": virtual,
            "pipeline_schedule": "interleaved" if virtual > 1 else "1f1b",
        },
        train_batch_size=2 * pp,
    )
    full = dict(Transformer(cfg.model, seed=cfg.train.seed).named_parameters())
    seen: set[str] = set()
    chunk_layers = []
    for stage in range(pp):
        model = build_stage_model(cfg, _stage_ctx(stage))
        chunks = list(model) if virtual > 1 else [model]
        assert len(chunks) == virtual
        for chunk in chunks:
            chunk_layers.append(chunk.layer_ids)
            for name, p in chunk.named_parameters():
                # local "layers.<j>." -> the global layer index of that block
                glob = re.sub(r"^layers\.(\d+)\.", lambda m, c=chunk: f"layers.{c.layer_ids[int(m[1])]}.", name)
                assert torch.equal(p, full[glob]), (stage, name)
                seen.add(glob)
    assert seen == set(full)  # every parameter somewhere (the tied head copy is embed.weight again)
    # model chunk k on device k % p: concatenating chunks in model order gives every layer once, in order
    by_model_chunk = [chunk_layers[s * virtual + c] for c in range(virtual) for s in range(pp)]
    assert [i for ids in by_model_chunk for i in ids] == list(range(layers))


def test_interleaved_needs_microbatches_multiple_of_stages(tmp_path):
    cfg = make_config(
        tmp_path,
        model={"n_layers": 8},
        train_batch_size=6,
        train_micro_batch_size_per_gpu=1,
        parallel={"pipeline": 4, "virtual_stages": 2, "pipeline_schedule": "interleaved"},
    )
    expected = (
        r"^interleaved 1F1B needs the number of micro-batches \(gradient_accumulation_steps=6\) to be a "
        r"multiple of parallel.pipeline=4"
    )
    with pytest.raises(ConfigError, match=expected):
        check_pipeline_layout(cfg, dp=1)
    with pytest.raises(ConfigError, match=expected):
        build_stage_model(cfg, _stage_ctx(0))


def test_more_chunks_than_layers_is_refused_with_numbers(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"parallel.pipeline: 4 stages x 2 virtual stages need at least that "
        r"many layers, model.n_layers is 6",
    ):
        make_config(
            tmp_path,
            model={"n_layers": 6},
            parallel={"pipeline": 4, "virtual_stages": 2, "pipeline_schedule": "interleaved"},
        )


@pytest.mark.parametrize(("p", "m", "v"), [(2, 3, 1), (4, 8, 1), (4, 8, 2), (3, 6, 3)])
def test_forward_only_streams_run_every_forward_once(p, m, v):
    streams = build_forward_only(stages=p, microbatches=m, virtual_stages=v)
    result = simulate(streams, virtual_stages=v, fwd_time=1, forward_only=True)  # raises on deadlock/mismatch
    assert all(
        sorted((sp.op.micro, sp.op.chunk) for sp in spans) == [(i, c) for i in range(m) for c in range(v)]
        for spans in result.spans
    )
    assert all(isinstance(sp.op, Forward) for spans in result.spans for sp in spans)
    assert result.makespan == m + Fraction(p - 1, v)  # the forward-only pipeline's fill, cut by v
