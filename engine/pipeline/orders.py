"""Compute orders of the classic schedules, one list per stage: GPipe, 1F1B (PipeDream-flush) and
Megatron-LM's interleaved 1F1B. ``exchanges.py`` turns them into full instruction streams."""

from __future__ import annotations

from engine.errors import ConfigError
from engine.pipeline.instructions import Backward, Forward


def check_order_args(stages: int, microbatches: int, stage: int) -> None:
    if stages < 1:
        raise ConfigError(f"parallel.pipeline must be at least 1, got {stages}")
    if microbatches < 1:
        raise ConfigError(f"gradient_accumulation_steps (micro-batches) must be at least 1, got {microbatches}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} outside [0, {stages})")


def gpipe_order(*, stages: int, microbatches: int, stage: int) -> list[Forward | Backward]:
    """GPipe: all forwards, then all backwards. Peak in-flight activations: m on every stage."""
    check_order_args(stages, microbatches, stage)
    order: list[Forward | Backward] = [Forward(i) for i in range(microbatches)]
    return order + [Backward(i) for i in range(microbatches)]


def one_f_one_b_order(*, stages: int, microbatches: int, stage: int) -> list[Forward | Backward]:
    """1F1B (PipeDream-flush): same bubble as GPipe, (p-1)/m, but at most p activations in flight."""
    check_order_args(stages, microbatches, stage)
    # Warmup: stage s runs p-s-1 forwards ahead so the last stage can start its first backward at once.
    warmup = min(stages - stage - 1, microbatches)
    order: list[Forward | Backward] = [Forward(i) for i in range(warmup)]
    # Steady state: one forward, one backward.
    for i in range(microbatches - warmup):
        order += [Forward(warmup + i), Backward(i)]
    # Cooldown: drain the backwards of the warmup forwards.
    return order + [Backward(i) for i in range(microbatches - warmup, microbatches)]


def interleaved_op(k: int, *, stages: int, chunks: int, forward: bool) -> Forward | Backward:
    """The k-th forward (or backward) on a device: micro-batches go in groups of p through every chunk
    (forward: chunks 0..v-1; backward: v-1..0), as in Megatron-LM's interleaved schedule."""
    group, within = divmod(k, stages * chunks)
    chunk, offset = divmod(within, stages)
    micro = group * stages + offset
    return Forward(micro, chunk) if forward else Backward(micro, chunks - 1 - chunk)


def interleaved_order(*, stages: int, microbatches: int, virtual_stages: int, stage: int) -> list[Forward | Backward]:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): bubble (p-1)/(v*m); needs m % p == 0."""
    check_order_args(stages, microbatches, stage)
    check_interleaved(stages=stages, microbatches=microbatches, virtual_stages=virtual_stages)
    v = virtual_stages
    if v == 1:  # one chunk per device is plain 1F1B (Megatron's warmup formula assumes v > 1)
        return one_f_one_b_order(stages=stages, microbatches=microbatches, stage=stage)
    total = microbatches * v
    # Warmup: 2 forwards per later stage (a chunk forward and its activation's trip back), plus one full
    # round of p micro-batches through the first v-1 chunks.
    warmup = min((stages - stage - 1) * 2 + (v - 1) * stages, total)

    def op(k: int, forward: bool) -> Forward | Backward:
        return interleaved_op(k, stages=stages, chunks=v, forward=forward)

    order: list[Forward | Backward] = [op(k, True) for k in range(warmup)]
    for i in range(total - warmup):  # steady state
        order += [op(warmup + i, True), op(i, False)]
    return order + [op(k, False) for k in range(total - warmup, total)]  # cooldown


def check_interleaved(*, stages: int, microbatches: int, virtual_stages: int) -> None:
    """Refuse layouts the interleaved schedule cannot run, with the numbers."""
    if virtual_stages < 1:
        raise ConfigError(f"parallel.virtual_stages must be at least 1, got {virtual_stages}")
    if stages < 2:
        raise ConfigError(
            f"the interleaved schedule needs parallel.pipeline >= 2, got {stages}",
            hint='use parallel.pipeline_schedule "1f1b" without pipeline parallelism',
        )
    if microbatches % stages != 0:
        raise ConfigError(
            f"interleaved 1F1B needs the number of micro-batches "
            f"(gradient_accumulation_steps={microbatches}) to be a multiple of parallel.pipeline={stages}",
            hint=f"use {microbatches + (-microbatches) % stages} micro-batches, or the 1f1b schedule",
        )
