"""Rebuild the full (tp=1, single-stage, unpadded) Trident state dict from a checkpoint of any layout.

A checkpoint holds one shard per rank (engine/checkpoint/store.py); each shard's ``model`` is the state
dict of that rank's model part: TP shards of every sharded matrix, the pipeline stage's chunk(s), and
with ZeRO (any stage) the full parameters of that (tp, pp) position, identical on every DP rank, so
DP rank 0 is read. Rank order follows engine/distributed/topology.py (tp fastest, then dp, then pp).

* TP: a parameter's shard dimension and block sizes (``tp_dim`` / ``tp_sizes`` on the live model) follow
  from its name (:func:`tp_layout`); shards are rejoined with ``unshard_blocks`` (so [q; k; v] and
  [gate; up] stay whole heads), and the vocabulary's TP padding rows are dropped.
* PP: stage ``s`` holds model chunks ``s, s + p, ...`` of ``partition_layers`` with the method of
  engine/pipeline/stage_model.py; chunk-local layer ``j`` of chunk ``c`` is global layer ``c.start + j``.
  With virtual stages a rank's names read ``"<local chunk>.layers.<j>..."``.
* fp32: with plain data parallelism the optimizer's fp32 master weights replace the compute-dtype
  model weights (exact export of bf16/fp16 runs); under ZeRO the model weights are used.
"""

from __future__ import annotations

import json
import os
import re

import torch

from engine.checkpoint import store
from engine.config import ModelConfig
from engine.config.schema import build
from engine.errors import CheckpointError
from engine.model.transformer import padded_vocab_size
from engine.tensor_parallel.init import unshard_blocks

Tensors = dict[str, torch.Tensor]
_LAYER = re.compile(r"^(?:(\d+)\.)?layers\.(\d+)\.(.+)$")


def tp_layout(name: str, m: ModelConfig, tp: int) -> tuple[int, tuple[int, ...]] | None:
    """(tp_dim, tp_sizes) of a parameter as engine/tensor_parallel/layers.py marks it; None if replicated."""
    hd = m.head_dim
    if name in ("embed.weight", "head.weight"):
        return 0, (padded_vocab_size(m.vocab_size, tp),)
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return 0, (m.n_heads * hd, m.kv_heads * hd, m.kv_heads * hd)
    if name.endswith(("mlp.up.weight", "mlp.up.bias")):
        return 0, ((m.ffn, m.ffn) if m.arch == "llama" else (m.ffn,))
    if name.endswith("attn.out.weight"):
        return 1, (m.n_heads * hd,)
    if name.endswith("mlp.down.weight"):
        return 1, (m.ffn,)
    return None


def resolve_checkpoint(path: str) -> str:
    """A step directory, or a save_dir whose newest complete checkpoint is taken."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    if os.path.isdir(path) and store.has_checkpoint(path):
        return store.latest_checkpoint(path)
    raise CheckpointError(
        f"{path}: not a checkpoint (no manifest.json) nor a save_dir holding one",
        hint="pass train.save_dir or one of its step_XXXXXXXX directories",
    )


def _plain(value):
    """asdict() keeps tuples; the schema wants JSON lists."""
    return json.loads(json.dumps(value))


def saved_config(shard: dict, path: str) -> dict:
    if "config" not in shard:
        raise CheckpointError(f"{path}: rank_00000.pt holds no config (saved by an older Trident?)")
    return _plain(shard["config"])


def model_config(raw: dict) -> ModelConfig:
    return build(ModelConfig, raw["model"], "model", {})


def _fp32_masters(shard: dict) -> Tensors:
    """Plain-DP optimizer state: flat fp32 masters per group, parameters packed in ``names`` order."""
    opt = shard.get("optimizer") or {}
    if "groups" not in opt:
        return {}
    model = shard["model"]
    out: Tensors = {}
    for g in opt["groups"]:
        offset = 0
        for name in g["names"]:
            if name not in model:
                return {}
            n = model[name].numel()
            out[name] = g["master"][offset : offset + n].view_as(model[name])
            offset += n
    return out


def _stage_params(shard: dict) -> Tensors:
    masters = _fp32_masters(shard)
    return {k: masters.get(k, v).float() for k, v in shard["model"].items()}


def _global_name(name: str, chunks: list) -> tuple[str, bool]:
    """(name in the full model, whether it is the last stage's copy of the tied embedding)."""
    m = _LAYER.match(name)
    if m is not None:
        local_chunk = int(m.group(1) or 0)
        return f"layers.{chunks[local_chunk].start + int(m.group(2))}.{m.group(3)}", False
    head_part = name.split(".", 1)
    if head_part[0].isdigit():  # "<local chunk>.embed.weight" etc. with virtual stages
        chunk, name = chunks[int(head_part[0])], head_part[1]
        return name, name == "embed.weight" and not chunk.has_embedding
    return name, name == "embed.weight" and not chunks[0].has_embedding


def gather_full_state(path: str) -> tuple[Tensors, dict]:
    """(full fp32 Trident state dict, saved config dict) from checkpoint ``path`` (step dir or save_dir)."""
    from engine.distributed.topology import Topology
    from engine.pipeline.partition import partition_layers

    path = resolve_checkpoint(path)
    manifest = store.read_manifest(path)
    problem = store.verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    first = store.load_shard(path, 0)
    raw = saved_config(first, path)
    m = model_config(raw)
    par = raw.get("parallel", {})
    tp, pp, v = int(par.get("tensor", 1)), int(par.get("pipeline", 1)), int(par.get("virtual_stages", 1))
    topo = Topology(manifest["world_size"], tp=tp, pp=pp)
    method = "layers"
    try:
        from engine.pipeline.stage_model import PARTITION_METHOD as method  # noqa: N811
    except ImportError:
        pass
    partition = partition_layers(m.n_layers, stages=pp, virtual_stages=v, method=method)
    full: Tensors = {}
    for stage in range(pp):
        ranks = [topo.rank(dp=0, pp=stage, tp=t) for t in range(tp)]
        shards = [_stage_params(first if r == 0 else store.load_shard(path, r)) for r in ranks]
        chunks = partition.chunks_of(stage)
        for name in shards[0]:
            global_name, tied_copy = _global_name(name, chunks)
            if tied_copy:
                continue  # the last stage's copy of the tied embedding equals the first stage's
            layout = tp_layout(global_name, m, tp)
            if layout is None or tp == 1:
                tensor = shards[0][name]
            else:
                tensor = unshard_blocks([s[name] for s in shards], dim=layout[0], sizes=layout[1])
            if global_name in ("embed.weight", "head.weight"):
                tensor = tensor[: m.vocab_size]  # drop the TP padding rows
            full[global_name] = tensor.contiguous()
    expected = m.n_layers
    found = {int(k.split(".")[1]) for k in full if k.startswith("layers.")}
    if found != set(range(expected)):
        raise CheckpointError(f"{path}: layers {sorted(set(range(expected)) - found)} are missing from the shards")
    return full, raw
