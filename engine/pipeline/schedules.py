"""Pipeline schedules as data: pure generators of small instruction objects, one stream per stage.

No torch, no processes: the executor runs these streams, the simulator (``simulate.py``) times them and
the tests check them, all from the same objects.

Vocabulary. ``p`` stages (devices), ``m`` micro-batches, ``v`` virtual stages (model chunks) per device.
The model is cut into ``p * v`` model chunks; device ``s`` holds local chunks ``0..v-1`` which are model
chunks ``s, s + p, s + 2p, ...`` (see ``partition.py``). Activations flow model chunk ``k -> k + 1``, i.e.
from device ``s`` to ``s + 1``, and from the last device back to device 0 for the next local chunk
(interleaved only); gradients flow the other way. Zero-bubble schedules (``zero_bubble.py``: ZB-H1) split
each backward into ``Backward`` (input gradient) and ``BackwardWeight`` (weight gradients).

Communication and the pairing convention. Point-to-point ops never appear alone: they are grouped in
``Exchange(ops)`` instructions; a runtime posts one ``Exchange`` as one ``batch_isend_irecv`` and waits for
all of it before the next instruction. A message's send (on the producing stage) and its receive (on the
consuming stage) always sit in exchanges that happen at the *same moment* of the schedule's nominal
unit-time timeline (``exchanges.py``), the way Megatron-LM pairs its ``send_forward_recv_backward`` calls,
so both peers post them together. A receive may come before the op that needs it: the runtime queues
received tensors per (micro-batch, chunk). Between two stages the k-th send matches the k-th receive
(messages are FIFO per ordered pair of ranks, as in NCCL and gloo), with the same (kind, micro-batch,
model chunk). ``simulate.simulate`` runs all stages together with rendezvous semantics (a send completes
only once the peer has posted the matching receive, the strictest transport) and raises on any mismatch,
deadlock or data dependency broken; the tests run it for p <= 8, m <= 32, v <= 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from engine.errors import ConfigError
from engine.pipeline.exchanges import weave_exchanges

# --- instructions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """Run local chunk ``chunk`` forward on micro-batch ``micro`` (model chunk 0 reads the batch; the last
    model chunk also computes the loss). Keep its activations until the matching Backward."""

    micro: int
    chunk: int = 0


@dataclass(frozen=True)
class Backward:
    """Backward of local chunk ``chunk`` on ``micro``; frees that micro-batch's activations of the chunk."""

    micro: int
    chunk: int = 0


@dataclass(frozen=True)
class BackwardWeight:
    """Zero-bubble schedules split the backward (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): there
    ``Backward`` computes only the input gradient, which the previous stage waits for, and this computes the
    weight gradients of (micro, chunk) later, where the stage would otherwise idle; it frees the
    activations."""

    micro: int
    chunk: int = 0


@dataclass(frozen=True)
class SendActivation:
    """Send the output of this stage's Forward(micro, chunk) to stage ``peer``."""

    micro: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class RecvActivation:
    """Receive from stage ``peer`` the input of this stage's Forward(micro, chunk)."""

    micro: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class SendGrad:
    """Send the input gradient computed by this stage's Backward(micro, chunk) to stage ``peer``."""

    micro: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class RecvGrad:
    """Receive from stage ``peer`` the output gradient needed by this stage's Backward(micro, chunk)."""

    micro: int
    chunk: int
    peer: int


P2POp = SendActivation | RecvActivation | SendGrad | RecvGrad


@dataclass(frozen=True)
class Exchange:
    """One batch of point-to-point ops, posted together (``batch_isend_irecv``) and waited on together."""

    ops: tuple[P2POp, ...]


@dataclass(frozen=True)
class ReduceGrads:
    """All micro-batches are done: reduce gradients over dp (and sum tied embeddings over first/last)."""


@dataclass(frozen=True)
class OptimizerStep:
    """Apply the optimizer to this stage's parameters."""


Instruction = Forward | Backward | BackwardWeight | Exchange | ReduceGrads | OptimizerStep
Compute = Forward | Backward | BackwardWeight

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1")

# --- compute orders ----------------------------------------------------------------------------------


def _check(stages: int, microbatches: int, stage: int) -> None:
    if stages < 1:
        raise ConfigError(f"parallel.pipeline must be at least 1, got {stages}")
    if microbatches < 1:
        raise ConfigError(
            f"gradient_accumulation_steps (micro-batches) must be at least 1, got {microbatches}"
        )
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} outside [0, {stages})")


def gpipe_order(*, stages: int, microbatches: int, stage: int) -> list[Forward | Backward]:
    """GPipe: all forwards, then all backwards. Peak in-flight activations: m on every stage."""
    _check(stages, microbatches, stage)
    order: list[Forward | Backward] = [Forward(i) for i in range(microbatches)]
    return order + [Backward(i) for i in range(microbatches)]


def one_f_one_b_order(*, stages: int, microbatches: int, stage: int) -> list[Forward | Backward]:
    """1F1B (PipeDream-flush): same bubble as GPipe, (p-1)/m, but at most p activations in flight."""
    _check(stages, microbatches, stage)
    # Warmup: stage s runs p-s-1 forwards ahead so the last stage can start its first backward at once.
    warmup = min(stages - stage - 1, microbatches)
    order: list[Forward | Backward] = [Forward(i) for i in range(warmup)]
    # Steady state: one forward, one backward.
    for i in range(microbatches - warmup):
        order += [Forward(warmup + i), Backward(i)]
    # Cooldown: drain the backwards of the warmup forwards.
    return order + [Backward(i) for i in range(microbatches - warmup, microbatches)]


def _interleaved_op(k: int, *, stages: int, chunks: int, forward: bool) -> Forward | Backward:
    """The k-th forward (or backward) on a device: micro-batches go in groups of p through every chunk
    (forward: chunks 0..v-1; backward: v-1..0), as in Megatron-LM's interleaved schedule."""
    group, within = divmod(k, stages * chunks)
    chunk, offset = divmod(within, stages)
    micro = group * stages + offset
    return Forward(micro, chunk) if forward else Backward(micro, chunks - 1 - chunk)


def interleaved_order(
    *, stages: int, microbatches: int, virtual_stages: int, stage: int
) -> list[Forward | Backward]:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): bubble (p-1)/(v*m); needs m % p == 0."""
    _check(stages, microbatches, stage)
    check_interleaved(stages=stages, microbatches=microbatches, virtual_stages=virtual_stages)
    v = virtual_stages
    if v == 1:  # one chunk per device is plain 1F1B (Megatron's warmup formula assumes v > 1)
        return one_f_one_b_order(stages=stages, microbatches=microbatches, stage=stage)
    total = microbatches * v
    # Warmup: 2 forwards per later stage (a chunk forward and its activation's trip back), plus one full
    # round of p micro-batches through the first v-1 chunks.
    warmup = min((stages - stage - 1) * 2 + (v - 1) * stages, total)

    def op(k: int, forward: bool) -> Forward | Backward:
        return _interleaved_op(k, stages=stages, chunks=v, forward=forward)

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


def build_all(
    name: str, *, stages: int, microbatches: int, virtual_stages: int = 1
) -> list[list[Instruction]]:
    """Every stage's instruction stream for schedule ``name`` (one of SCHEDULE_NAMES); index = stage."""
    if name not in SCHEDULE_NAMES:
        raise ConfigError(
            f"parallel.pipeline_schedule: unknown schedule {name!r}", hint=", ".join(SCHEDULE_NAMES)
        )
    if name == "interleaved":
        check_interleaved(stages=stages, microbatches=microbatches, virtual_stages=virtual_stages)
        orders = [
            interleaved_order(
                stages=stages, microbatches=microbatches, virtual_stages=virtual_stages, stage=s
            )
            for s in range(stages)
        ]
        return weave_exchanges(orders, stages=stages, chunks=virtual_stages)
    if virtual_stages != 1:
        raise ConfigError(
            f"parallel.virtual_stages={virtual_stages} needs the interleaved schedule, not {name!r}",
            hint='set parallel.pipeline_schedule to "interleaved" or parallel.virtual_stages to 1',
        )
    if name == "zb-h1":
        from engine.pipeline.zero_bubble import zb_h1_orders  # noqa: PLC0415 - it imports this module

        return weave_exchanges(zb_h1_orders(stages=stages, microbatches=microbatches), stages=stages, chunks=1)
    build = gpipe_order if name == "gpipe" else one_f_one_b_order
    orders = [build(stages=stages, microbatches=microbatches, stage=s) for s in range(stages)]
    return weave_exchanges(orders, stages=stages, chunks=1)


def build_forward_only(*, stages: int, microbatches: int, virtual_stages: int = 1) -> list[list[Instruction]]:
    """Evaluation streams: every forward in the training order (with v > 1, micro-batches in groups of p
    through the chunks), no backwards; exchanges paired like the training streams."""
    _check(stages, microbatches, 0)
    v = virtual_stages
    if v == 1:
        order: list[Forward | Backward] = [Forward(i) for i in range(microbatches)]
    else:
        order = [_interleaved_op(k, stages=stages, chunks=v, forward=True) for k in range(microbatches * v)]
    return weave_exchanges([order] * stages, stages=stages, chunks=v)


def schedule(
    name: str, *, stages: int, microbatches: int, stage: int, virtual_stages: int = 1
) -> Iterator[Instruction]:
    """The instruction stream of one stage (what the executor iterates). Pairing exchanges needs every
    stage's order, so this builds them all; cheap next to one training step."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} outside [0, {stages})")
    yield from build_all(name, stages=stages, microbatches=microbatches, virtual_stages=virtual_stages)[stage]
