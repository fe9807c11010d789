"""Builds the ZeRO optimizer for a model from the config: buckets, reducer and (stage 3) gatherer."""

from __future__ import annotations

from torch import nn

from engine.optim.param_groups import split_decay
from engine.zero.buckets import build_buckets
from engine.zero.optimizer import ZeroOptimizer

ALL_IN_ONE = 1 << 62  # stage-3 buckets are whole units (one all-gather per layer); stage 2 + overlap: one bucket


def model_chunks(model: nn.Module) -> list[nn.Module]:
    """The ``Transformer`` chunk(s) of this rank: the model itself, or the pipeline stage's ``ModuleList``."""
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def _units(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Unit 0: parameters outside the chunks' ``layers`` (embedding, positions, final norm, head); then one
    unit per block, chunk by chunk in forward order (the order ``ParamGatherer`` numbers them)."""
    blocks = [block for chunk in model_chunks(model) for block in getattr(chunk, "layers", [])]
    unit_of = {id(p): i for i, block in enumerate(blocks, start=1) for p in block.parameters()}
    units: list[list] = [[] for _ in range(len(blocks) + 1)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            units[unit_of.get(id(p), 0)].append((name, p))
    return units


def build_zero_optimizer(cfg, ctx, model: nn.Module, grad_sync, *, use_kernels: bool = False) -> ZeroOptimizer:
    """The ZeRO optimizer of ``cfg.zero_optimization.stage`` over ``model``'s trainable parameters; its AdamW
    runs the fused kernel when ``use_kernels``."""
    from engine.config import resolve_batch
    from engine.distributed.collectives import Group
    from engine.optim.grad_sync import LocalGradSync

    zero = cfg.zero_optimization
    stage = zero.stage
    sync = grad_sync or LocalGradSync()
    dp = ctx.groups.dp if ctx.groups is not None else Group.single("dp", ctx.rank, ctx.counter)
    wd = cfg.optimizer.params.weight_decay
    emb = getattr(sync, "embedding_group", None)
    isolate = tuple(n for n, _ in model.named_parameters() if emb is not None and n.endswith("embed.weight"))
    common = dict(dp_size=dp.size, dp_rank=dp.rank, full_grad=stage == 1, isolate=isolate)
    decay, no_decay = split_decay(list(model.named_parameters()), decay_embeddings=cfg.train.decay_embeddings)
    decays = {**{n: wd for n, _ in decay}, **{n: 0.0 for n, _ in no_decay}}
    trained = [(n, p) for n, p in model.named_parameters() if n in decays]
    buckets, units = [], []
    named_units = _units(model)
    unit_of = {id(p): i for i, named in enumerate(named_units) for _, p in named}  # stage-2 reduce pieces
    pieces_by_unit = stage == 2 and zero.overlap_comm
    if stage < 3:
        # Decay classes share buckets (per-range weight decay): fewer, larger collectives. Stage 2 with
        # overlap_comm lays the model out as one bucket and reduces it in backward-ordered pieces of at most
        # reduce_bucket_size elements (engine/zero/pieces.py); otherwise buckets are reduce_bucket_size.
        size = ALL_IN_ONE if pieces_by_unit else zero.reduce_bucket_size
        buckets = build_buckets(trained, weight_decay=decays, bucket_size=size, **common)
    else:
        threshold = zero.stage3_param_persistence_threshold
        for i, named in enumerate(named_units):
            unit = []
            # One partitioned bucket per unit: one all-gather per block before its forward and its backward.
            for persistent in (False, True):
                chosen = [(n, p) for n, p in named if n in decays and (p.numel() < threshold) == persistent]
                if chosen:
                    unit += build_buckets(
                        chosen,
                        weight_decay=decays,
                        bucket_size=ALL_IN_ONE,
                        unit=i,
                        partitioned=not persistent,
                        **common,
                    )
            units.append(unit)
            buckets += unit
    gatherer = None
    if stage == 3:
        from engine.zero.stage3 import ParamGatherer

        gatherer = ParamGatherer(
            model,
            units,
            dp,
            prefetch_numel=zero.stage3_prefetch_bucket_size,
            max_live_numel=zero.stage3_max_live_parameters,
            max_reuse_distance=zero.stage3_max_reuse_distance,
            hold_outer=cfg.parallel.pipeline > 1,
        )
    return ZeroOptimizer(
        buckets,
        cfg.optimizer,
        stage=stage,
        clip=cfg.gradient_clipping,
        grad_sync=sync,
        dp_group=dp,
        micro_batches=resolve_batch(cfg, ctx.dp_size).grad_accum,
        overlap_comm=zero.overlap_comm,
        use_kernels=use_kernels,
        gatherer=gatherer,
        allgather_bucket_size=zero.allgather_bucket_size,
        unit_of=unit_of,
        piece_numel=zero.reduce_bucket_size if pieces_by_unit else None,
    )
