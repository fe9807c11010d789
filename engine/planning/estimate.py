"""Back-of-the-envelope sizing of a run: parameters, FLOPs, the Chinchilla-optimal token count,
model-state memory per device for each ZeRO stage, activation memory and time at a given MFU (what
``python -m engine.plan`` prints).
"""

from __future__ import annotations

from engine.errors import ConfigError


def zero_model_state_breakdown(
    params_per_device: float, stage: int, dp: int, *, param_bytes: int = 2, grad_bytes: int = 4
) -> dict[str, float]:
    """Model-state bytes per device as Trident holds them (Rajbhandari et al. 2019, with Trident's fp32
    gradients): parameters in the compute dtype (``param_bytes``), fp32 gradients, and 12 bytes of
    optimizer state (fp32 master, momentum, variance). Stage 1 shards the optimizer states across the dp
    ranks, stage 2 also the gradients, stage 3 also the parameters. In fp32 stage 0 the parameters are the
    masters, so the optimizer adds only the two moments. ``engine.zero``'s ``model_state_bytes()`` reports
    the same numbers (with ``params_per_device`` padded to a multiple of dp per bucket)."""
    p = params_per_device
    optimizer = 8 * p if (stage == 0 and param_bytes == 4) else 12 * p
    return {
        "params": param_bytes * p / (dp if stage == 3 else 1),
        "grads": grad_bytes * p / (dp if stage >= 2 else 1),
        "optimizer": optimizer / (dp if stage >= 1 else 1),
    }


def zero_model_state_bytes(
    params_per_device: float, stage: int, dp: int, *, param_bytes: int = 2, grad_bytes: int = 4
) -> float:
    """Total of :func:`zero_model_state_breakdown`."""
    return sum(
        zero_model_state_breakdown(
            params_per_device, stage, dp, param_bytes=param_bytes, grad_bytes=grad_bytes
        ).values()
    )


def zero_comm_elements_per_step(
    params_per_device: float, stage: int, *, micro_batches: int = 1, kept: float = 0.0
) -> float:
    """Data-parallel elements moved per rank per step (all-reduce = reduce-scatter + all-gather): 2 Psi for
    stages 0-1; stage 2 reduce-scatters every micro-batch; stage 3 also gathers every layer twice per
    micro-batch (3 Psi per micro-batch, a little less since the embeddings are gathered once), except the
    ``kept`` elements of blocks that ``stage3_max_reuse_distance`` keeps from forward to backward (once)."""
    p, a = params_per_device, micro_batches
    return {0: 2 * p, 1: 2 * p, 2: (a + 1) * p, 3: a * (3 * p - kept)}[stage]


def stage3_kept_elements(cfg, *, tp: int, pp: int) -> tuple[int, float]:
    """(blocks, elements per device) that ``stage3_max_reuse_distance`` and ``stage3_max_live_parameters``
    keep gathered from forward to backward (engine/zero/live_params.py), on the pipeline stage that computes
    the head: its blocks and its outer unit (the embedding table or head, and on one stage the rest)."""
    from engine.model.transformer import count_parameters
    from engine.zero.live_params import kept_blocks

    m, zero = cfg.model, cfg.zero_optimization
    counts = count_parameters(m)
    block = counts["non_embedding"] / (m.n_layers * tp)
    outer = counts["embedding"] / tp if pp == 1 else m.vocab_size * m.d_model / tp
    numel = [int(outer)] + [int(block)] * -(-m.n_layers // pp)
    kept = kept_blocks(
        numel,
        computes_head=True,
        max_reuse_distance=zero.stage3_max_reuse_distance,
        max_live=zero.stage3_max_live_parameters,
    )
    return len(kept), float(sum(numel[u] for u in kept))


def activation_bytes_per_layer(
    *, seq: int, micro_batch: int, hidden: int, heads: int, tp: int, sequence_parallel: bool, recompute: str
) -> float:
    """16-bit activation memory of one transformer layer (Korthikanti et al. 2022, table 2)."""
    sbh = seq * micro_batch * hidden
    if recompute == "full":
        return 2.0 * sbh / (tp if sequence_parallel else 1)  # only the layer input is kept
    attn_core = 0.0 if recompute == "selective" else 5.0 * heads * seq / hidden
    if sequence_parallel:
        return sbh * (34.0 + attn_core) / tp
    return sbh * (10.0 + (24.0 + attn_core) / tp)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _fmt_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def plan(cfg, *, world_size: int, tokens: float | None, mfu: float, peak_tflops: float | None) -> list[str]:
    from engine.config import resolve_batch
    from engine.metrics.flops import PEAK_TFLOPS, flops_per_token
    from engine.model.transformer import count_parameters

    m, par = cfg.model, cfg.parallel
    tp, pp = par.tensor, par.pipeline
    if world_size % (tp * pp):
        raise ConfigError(f"--world-size: {world_size} is not divisible by tensor {tp} x pipeline {pp}")
    dp = world_size // (tp * pp)
    batch = resolve_batch(cfg, dp)
    counts = count_parameters(m)
    n = counts["total"]
    fpt = flops_per_token(m)
    tokens = tokens if tokens is not None else float(cfg.train.max_steps * batch.global_batch * m.seq_len)
    total_flops = fpt * tokens
    peak = peak_tflops or PEAK_TFLOPS["H100"][cfg.dtype_name if cfg.dtype_name != "fp32" else "bf16"]
    seconds = total_flops / (world_size * peak * 1e12 * mfu)
    per_device = n / (tp * pp)
    pbytes = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.dtype_name]
    lines = [
        f"model            {m.arch}, {m.n_layers} layers x d_model {m.d_model}, {m.n_heads} heads, seq {m.seq_len}, "
        f"vocab {m.vocab_size}",
        f"parameters       {_fmt_count(n)} total ({_fmt_count(counts['non_embedding'])} non-embedding)",
        f"layout           world {world_size} = dp {dp} x tp {tp} x pp {pp}; global batch {batch.global_batch} = "
        f"micro {batch.micro_batch} x accumulation {batch.grad_accum} x dp {dp}",
        f"flops/token      {fpt:.4g} (6N + 12*L*d*S; see engine/metrics/flops.py)",
        f"tokens           {_fmt_count(tokens)}; chinchilla-optimal ~20N = {_fmt_count(20 * n)}",
        f"training flops   {total_flops:.4g} (6*N*D = {6 * n * tokens:.4g})",
        f"time             {seconds / 3600:.2f} h on {world_size} devices at {mfu:.0%} MFU of {peak:g} TFLOP/s "
        f"= {seconds * world_size / 3600:.1f} device-hours",
        f"model-state memory per device ({pbytes} bytes params + 4 fp32 grads + 12 Adam states per param; "
        f"ZeRO over dp={dp}) and DP traffic per step:",
    ]
    n_kept, kept = stage3_kept_elements(cfg, tp=tp, pp=pp)
    for stage in range(4):
        mark = " <- configured" if stage == cfg.zero_optimization.stage else ""
        parts = zero_model_state_breakdown(per_device, stage, dp, param_bytes=pbytes)
        comm = (
            zero_comm_elements_per_step(per_device, stage, micro_batches=batch.grad_accum, kept=kept) if dp > 1 else 0
        )
        note = f" ({n_kept} blocks kept gathered forward to backward)" if stage == 3 and n_kept else ""
        lines.append(
            f"  ZeRO stage {stage}     {_fmt_bytes(sum(parts.values()))} (params "
            f"{_fmt_bytes(parts['params'])}, grads {_fmt_bytes(parts['grads'])}, optimizer "
            f"{_fmt_bytes(parts['optimizer'])}); DP comm ~{_fmt_count(comm)} elements{note}{mark}"
        )
    layers_per_stage = -(-m.n_layers // pp)
    act = activation_bytes_per_layer(
        seq=m.seq_len,
        micro_batch=batch.micro_batch,
        hidden=m.d_model,
        heads=m.n_heads,
        tp=tp,
        sequence_parallel=par.sequence_parallel,
        recompute=m.recompute,
    )
    in_flight = pp if pp > 1 else 1  # 1F1B keeps up to pp micro-batches of activations on the first stage
    act_total = _fmt_bytes(act * layers_per_stage * in_flight)
    lines.append(
        f"activations      {_fmt_bytes(act)} per layer per micro-batch; ~{act_total} per device"
        f" ({layers_per_stage} layers x {in_flight} in flight, recompute={m.recompute})"
    )
    return lines
