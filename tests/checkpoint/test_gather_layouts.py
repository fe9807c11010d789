"""The export gathers a checkpoint of any layout into exactly the single-device model.

Layout-independent init (engine/tensor_parallel/init.py) means every rank's freshly built part holds its
piece of the same full weights, so a checkpoint written by hand from those parts - the files a real
run of that layout saves - must gather to the tp=1 model's state dict bit for bit: TP shards rejoined
block-wise ([q; k; v], [gate; up]), vocabulary padding dropped, pipeline chunks (also interleaved) put
back at their global layer ids, the last stage's tied-embedding copy skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types

import pytest
import torch
from torch import nn

from engine.checkpoint.gather import gather_full_state, tp_layout
from engine.config import config_to_dict, parse_config
from engine.distributed.topology import Topology
from engine.model.transformer import Transformer
from engine.pipeline.partition import partition_layers
from tests.hf.hf_helpers import GPT2_MODEL, LLAMA_MODEL, raw_config

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)]  # (tp, pp, virtual stages)


def _config(tmp, model, tp, pp, v):
    raw = raw_config(tmp, {**model, "n_layers": 4})
    raw["parallel"] = {
        "tensor": tp,
        "pipeline": pp,
        "virtual_stages": v,
        "pipeline_schedule": "interleaved" if v > 1 else "1f1b",
    }
    return parse_config(raw)


def _rank_model(cfg, *, tp_rank: int, pp_rank: int) -> nn.Module:
    par = cfg.parallel
    group = types.SimpleNamespace(size=par.tensor, rank=tp_rank) if par.tensor > 1 else None
    chunks = [
        Transformer(
            cfg.model,
            seed=cfg.train.seed,
            tp_group=group,
            first=c.has_embedding,
            last=c.has_head,
            layer_ids=list(c.layers),
        )
        for c in partition_layers(cfg.model.n_layers, stages=par.pipeline, virtual_stages=par.virtual_stages).chunks_of(
            pp_rank
        )
    ]
    return chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)


def write_checkpoint(cfg, path, *, dp: int = 2) -> None:
    """The files engine/checkpoint/store.py writes, one shard per rank of a dp x tp x pp world."""
    par = cfg.parallel
    topo = Topology(dp * par.tensor * par.pipeline, tp=par.tensor, pp=par.pipeline)
    path.mkdir(parents=True)
    shards = {}
    for rank in range(topo.world_size):
        c = topo.coords(rank)
        model = _rank_model(cfg, tp_rank=c.tp, pp_rank=c.pp)
        fname = f"rank_{rank:05d}.pt"
        torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, path / fname)
        shards[fname] = hashlib.sha256((path / fname).read_bytes()).hexdigest()
    manifest = {
        "format_version": 1,
        "step": 1,
        "world_size": topo.world_size,
        "shards": shards,
        "layout": {"dp": dp, "tp": par.tensor, "pp": par.pipeline, "world_size": topo.world_size},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("model", [GPT2_MODEL, LLAMA_MODEL], ids=["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp{}-pp{}-v{}".format(*t))
def test_gather_equals_single_device_model(tmp_path, model, layout):
    cfg = _config(tmp_path, model, *layout)
    write_checkpoint(cfg, tmp_path / "step")
    full, raw = gather_full_state(str(tmp_path / "step"))
    single = dataclasses.replace(cfg.model)
    ref = Transformer(single, seed=cfg.train.seed).state_dict()
    assert set(full) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(full[name], tensor), name
    assert raw["parallel"]["tensor"] == layout[0]


def test_tp_layout_matches_the_live_parameters(tmp_path):
    """The name -> (tp_dim, tp_sizes) rule equals the attributes the TP layers put on their parameters."""
    for model in (GPT2_MODEL, LLAMA_MODEL):
        cfg = _config(tmp_path, model, 2, 1, 1)
        live = _rank_model(cfg, tp_rank=0, pp_rank=0)
        for name, p in live.named_parameters():
            expected = None if p.tp_dim is None else (p.tp_dim, tuple(p.tp_sizes))
            assert tp_layout(name, cfg.model, 2) == expected, name
