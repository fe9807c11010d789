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

from engine.errors import ConfigError
from engine.pipeline.exchanges import weave_exchanges
from engine.pipeline.instructions import (
    Backward,
    BackwardWeight,
    Compute,
    Exchange,
    Forward,
    Instruction,
    OptimizerStep,
    P2POp,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    SendActivation,
    SendGrad,
)
from engine.pipeline.orders import (
    check_interleaved,
    check_order_args,
    gpipe_order,
    interleaved_op,
    interleaved_order,
    one_f_one_b_order,
)
from engine.pipeline.zero_bubble import zb_h1_orders

# the instruction types and compute orders, importable from here as the public face of the schedules
__all__ = [
    "SCHEDULE_NAMES",
    "Backward",
    "BackwardWeight",
    "Compute",
    "Exchange",
    "Forward",
    "Instruction",
    "OptimizerStep",
    "P2POp",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "SendActivation",
    "SendGrad",
    "build_all",
    "build_forward_only",
    "check_interleaved",
    "gpipe_order",
    "interleaved_order",
    "one_f_one_b_order",
    "schedule",
]

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1")


def build_all(name: str, *, stages: int, microbatches: int, virtual_stages: int = 1) -> list[list[Instruction]]:
    """Every stage's instruction stream for schedule ``name`` (one of SCHEDULE_NAMES); index = stage."""
    if name not in SCHEDULE_NAMES:
        raise ConfigError(f"parallel.pipeline_schedule: unknown schedule {name!r}", hint=", ".join(SCHEDULE_NAMES))
    if name == "interleaved":
        check_interleaved(stages=stages, microbatches=microbatches, virtual_stages=virtual_stages)
        orders = [
            interleaved_order(stages=stages, microbatches=microbatches, virtual_stages=virtual_stages, stage=s)
            for s in range(stages)
        ]
        return weave_exchanges(orders, stages=stages, chunks=virtual_stages)
    if virtual_stages != 1:
        raise ConfigError(
            f"parallel.virtual_stages={virtual_stages} needs the interleaved schedule, not {name!r}",
            hint='set parallel.pipeline_schedule to "interleaved" or parallel.virtual_stages to 1',
        )
    if name == "zb-h1":
        return weave_exchanges(zb_h1_orders(stages=stages, microbatches=microbatches), stages=stages, chunks=1)
    build = gpipe_order if name == "gpipe" else one_f_one_b_order
    orders = [build(stages=stages, microbatches=microbatches, stage=s) for s in range(stages)]
    return weave_exchanges(orders, stages=stages, chunks=1)


def build_forward_only(*, stages: int, microbatches: int, virtual_stages: int = 1) -> list[list[Instruction]]:
    """Evaluation streams: every forward in the training order (with v > 1, micro-batches in groups of p
    through the chunks), no backwards; exchanges paired like the training streams."""
    check_order_args(stages, microbatches, 0)
    v = virtual_stages
    if v == 1:
        order: list[Forward | Backward] = [Forward(i) for i in range(microbatches)]
    else:
        order = [interleaved_op(k, stages=stages, chunks=v, forward=True) for k in range(microbatches * v)]
    return weave_exchanges([order] * stages, stages=stages, chunks=v)


def schedule(
    name: str, *, stages: int, microbatches: int, stage: int, virtual_stages: int = 1
) -> Iterator[Instruction]:
    """The instruction stream of one stage (what the executor iterates). Pairing exchanges needs every
    stage's order, so this builds them all; cheap next to one training step."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} outside [0, {stages})")
    yield from build_all(name, stages=stages, microbatches=microbatches, virtual_stages=virtual_stages)[stage]
