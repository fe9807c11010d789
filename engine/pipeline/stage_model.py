"""This rank's pipeline stage: the model chunk(s) it holds, built as ordinary ``Transformer``s.

The model itself knows nothing of pipelining: a chunk is a ``Transformer`` with ``first``/``last`` flags and
a slice of ``layer_ids``. Parameters are drawn from generators seeded by their *name* (``layers.<i>...``
with the global layer index), so every stage starts with exactly the single-device weights, and the
tied head on the last stage starts as an exact copy of the first stage's embedding (its gradient is summed
over the embedding group by ``engine.optim.grad_sync.DistGradSync``).

With ``v`` virtual stages the rank holds ``v`` non-adjacent chunks (model chunks ``s, s+p, ...``, see
``partition.py``) as an ``nn.ModuleList``, so parameter names read ``"<local chunk>.layers.<i>..."``.
"""

from __future__ import annotations

from torch import nn

from engine.config import TridentConfig, resolve_batch
from engine.model.transformer import Transformer
from engine.pipeline.partition import Partition, partition_layers
from engine.pipeline.schedules import check_interleaved

# Megatron-LM's default: an equal number of layers per chunk (the embedding and head ride on the ends).
PARTITION_METHOD = "layers"


def check_pipeline_layout(cfg: TridentConfig, *, dp: int) -> int:
    """Refuse layouts the schedules cannot run, with the numbers; returns the micro-batches per step."""
    par = cfg.parallel
    microbatches = resolve_batch(cfg, dp).grad_accum
    partition_layers(cfg.model.n_layers, stages=par.pipeline, virtual_stages=par.virtual_stages)
    if par.pipeline_schedule == "interleaved":
        check_interleaved(stages=par.pipeline, microbatches=microbatches, virtual_stages=par.virtual_stages)
    return microbatches


def stage_partition(cfg: TridentConfig) -> Partition:
    par = cfg.parallel
    return partition_layers(
        cfg.model.n_layers, stages=par.pipeline, virtual_stages=par.virtual_stages, method=PARTITION_METHOD
    )


def build_stage_model(cfg: TridentConfig, ctx, *, use_kernels: bool = False) -> nn.Module:
    """The chunk(s) of pipeline stage ``ctx.pp_rank`` in fp32 (one ``Transformer``, or a ``ModuleList`` of
    ``virtual_stages`` of them), on Trident's fused kernels when ``use_kernels``."""
    check_pipeline_layout(cfg, dp=ctx.dp_size)
    tp_group = getattr(ctx.groups, "tp", None) if ctx.groups is not None else None
    chunks = [
        Transformer(
            cfg.model,
            seed=cfg.train.seed,
            tp_group=tp_group,
            sequence_parallel=cfg.parallel.sequence_parallel,
            use_kernels=use_kernels,
            first=c.has_embedding,
            last=c.has_head,
            layer_ids=list(c.layers),
        )
        for c in stage_partition(cfg).chunks_of(ctx.pp_rank)
    ]
    return chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
