"""Composition helpers: the components of a run (model, step runner, optimizer, data) built from config.

The trainer calls these; each returns a ready object and keeps no state of its own. The kernel choice
(``use_kernels``) is made here once and passed down to the model, pipeline stages and optimizers.
"""

from __future__ import annotations

import os

import torch

from engine.config import BatchSizes, TridentConfig
from engine.data.tokenizer import Tokenizer
from engine.errors import ConfigError
from engine.model.transformer import Transformer
from engine.training.context import RunContext

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_kernels(cfg: TridentConfig, device: torch.device) -> bool:
    """``model.kernels``, defaulting to on for CUDA."""
    return cfg.model.kernels if cfg.model.kernels is not None else device.type == "cuda"


def build_model(cfg: TridentConfig, ctx: RunContext):
    """This rank's part of the model in fp32 on ``ctx.device``: the whole model (TP-sharded when tp > 1),
    or with pipeline parallelism the stage's chunk(s) (engine/pipeline/stage_model.py)."""
    if cfg.parallel.pipeline > 1:
        from engine.pipeline.stage_model import build_stage_model

        return build_stage_model(cfg, ctx, use_kernels=use_kernels(cfg, ctx.device)).to(ctx.device)
    groups = ctx.groups
    tp_group = getattr(groups, "tp", None) if groups is not None else None
    model = Transformer(
        cfg.model,
        seed=cfg.train.seed,
        tp_group=tp_group,
        sequence_parallel=cfg.parallel.sequence_parallel,
        use_kernels=use_kernels(cfg, ctx.device),
        rng=ctx.rng,
    )
    return model.to(ctx.device)


def load_tokenizer(cfg: TridentConfig) -> Tokenizer | None:
    """The configured tokenizer, else the one prepare copied beside the first dataset, else None."""
    path = cfg.data.tokenizer
    if path is None and cfg.data.datasets:
        from engine.data.shards import TOKENIZER_SUFFIX

        beside = cfg.data.datasets[0].prefix + TOKENIZER_SUFFIX
        path = beside if os.path.isfile(beside) else None
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer: {path} not found")
    return Tokenizer.load(path)


def build_datasets(cfg: TridentConfig, ctx: RunContext, batch: BatchSizes, tokenizer: Tokenizer | None):
    """(train, valid) datasets sized for the whole run; rank 0 builds cached indices, others map them."""
    from engine.data.dataset import SyntheticDataset
    from engine.data.dataset import build_datasets as build

    seq = cfg.model.seq_len
    if cfg.data.synthetic:
        return SyntheticDataset(cfg.model.vocab_size, seq, cfg.data.seed), None
    n_train = batch.global_batch * cfg.train.max_steps
    evals = cfg.train.max_steps // cfg.train.eval_interval if cfg.train.eval_interval else 0
    n_valid = batch.global_batch * cfg.train.eval_iters if evals or cfg.train.eval_interval else 0
    kwargs = dict(
        prefixes=[d.prefix for d in cfg.data.datasets],
        weights=[d.weight for d in cfg.data.datasets],
        seq_len=seq,
        seed=cfg.data.seed,
        num_train_samples=n_train,
        num_valid_samples=n_valid,
        valid_fraction=cfg.data.valid_fraction,
        valid_prefixes=[d.prefix for d in cfg.data.valid_datasets] or None,
        valid_weights=[d.weight for d in cfg.data.valid_datasets] or None,
        cache_dir=cfg.data.cache_dir,
        vocab_size=cfg.model.vocab_size,
        tokenizer_sha256=tokenizer.sha256 if (tokenizer is not None and cfg.data.tokenizer) else None,
    )
    if ctx.rank == 0:
        result = build(**kwargs, build_index=True)
    ctx.barrier()
    if ctx.rank != 0:
        result = build(**kwargs, build_index=False)
    return result


def build_step_runner(cfg: TridentConfig, ctx: RunContext, model):
    """Runs one step's micro-batches forward and backward: the pipeline executor when pp > 1."""
    if cfg.parallel.pipeline > 1:
        from engine.pipeline.executor import PipelineExecutor

        return PipelineExecutor(cfg, ctx, model)
    from engine.model.step import SingleStageRunner

    return SingleStageRunner(model)


def build_optimizer(cfg: TridentConfig, ctx: RunContext, model, grad_sync):
    """Plain data parallelism (ZeRO stage 0) or the ZeRO optimizer over the same flat buffers."""
    if cfg.zero_optimization.stage > 0:
        from engine.zero import build_zero_optimizer

        return build_zero_optimizer(cfg, ctx, model, grad_sync, use_kernels=use_kernels(cfg, ctx.device))
    from engine.config import resolve_batch
    from engine.optim.mixed_precision import MixedPrecisionOptimizer

    zero = cfg.zero_optimization
    return MixedPrecisionOptimizer(
        model,
        cfg.optimizer,
        clip=cfg.gradient_clipping,
        decay_embeddings=cfg.train.decay_embeddings,
        use_kernels=use_kernels(cfg, ctx.device),
        grad_sync=grad_sync,
        reduce_bucket_size=zero.reduce_bucket_size,
        overlap_comm=zero.overlap_comm,
        micro_batches=resolve_batch(cfg, ctx.dp_size).grad_accum,
    )
