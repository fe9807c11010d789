"""The instructions of a pipeline schedule: what one stage does next (compute, exchange, reduce, step).

Pure data (frozen dataclasses): ``orders.py`` and ``zero_bubble.py`` produce compute orders of them,
``exchanges.py`` weaves the point-to-point exchanges in, ``schedules.py`` assembles the streams that the
executor runs and the simulator times.
"""

from __future__ import annotations

from dataclasses import dataclass


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
