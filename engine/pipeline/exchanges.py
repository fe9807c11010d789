"""Place point-to-point exchanges into the per-stage compute orders of a schedule.

The pairing convention (what makes a runtime that posts each ``Exchange`` as one ``batch_isend_irecv`` and
waits for it deadlock-free): a message's send and its receive sit in exchanges that happen *at the same
moment* of the schedule's nominal timeline, so both peers post them together, as Megatron-LM pairs its
``send_forward_backward_recv_forward_backward`` calls by iteration.

1. Nominal timeline: every stage runs its compute order as early as the data allows, every op taking one
   unit of time and communication none (an "as soon as possible" list schedule). Unit ops put every
   stage between two ops at every integer moment, so a common moment always exists below.
2. A message from op X on stage s to op Y on stage t is exchanged at the first moment T >= end(X) at
   which neither s nor t is in the middle of an op (with unit ops, T = end(X) <= start(Y); checked).
3. Each stage's stream is its compute ops and its exchanges sorted by time; ops inside one exchange are
   sorted by message, so two messages on the same channel are posted in the same order on both sides.

A receive may thus come before the op that needs it (the runtime keeps it in a queue per chunk); the
simulator (``simulate.py``) checks the result for deadlocks, mismatches and data dependencies.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from fractions import Fraction

from engine.pipeline.instructions import (
    Backward,
    BackwardWeight,
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

# Unit times for both: with backward = 2 x forward, interleaved 1F1B has messages whose producer and
# consumer stages share no op boundary before the consumer needs the data (e.g. p=2, m=4, v=2).
NOMINAL_FORWARD = Fraction(1)
NOMINAL_BACKWARD = Fraction(1)


def _model_chunk(chunk: int, stage: int, stages: int) -> int:
    return chunk * stages + stage


def _producer(op, *, stage: int, stages: int, chunks: int) -> tuple[int, int] | None:
    """(stage, op) position of the op whose output ``op`` consumes, as (stage, local chunk); None if local."""
    if isinstance(op, BackwardWeight):  # needs only its own stage's Backward
        return None
    k = _model_chunk(op.chunk, stage, stages) + (-1 if isinstance(op, Forward) else 1)
    if not 0 <= k < stages * chunks:
        return None
    return k % stages, k // stages


def _timeline(orders: Sequence[Sequence], *, stages: int, chunks: int) -> list[list[tuple[Fraction, Fraction]]]:
    """ASAP (start, end) of every op in ``orders[s]``; raises if the orders cannot make progress."""
    ends: dict[tuple[int, type, int, int], Fraction] = {}  # (stage, kind, micro, chunk) -> end
    times: list[list[tuple[Fraction, Fraction]]] = [[] for _ in range(stages)]
    free = [Fraction(0)] * stages
    pos = [0] * stages
    remaining = sum(len(o) for o in orders)
    while remaining:
        moved = False
        for s in range(stages):
            while pos[s] < len(orders[s]):
                op = orders[s][pos[s]]
                deps = []
                src = _producer(op, stage=s, stages=stages, chunks=chunks)
                if src is not None:
                    deps.append((src[0], type(op), op.micro, src[1]))
                if isinstance(op, Backward):
                    deps.append((s, Forward, op.micro, op.chunk))
                if isinstance(op, BackwardWeight):
                    deps.append((s, Backward, op.micro, op.chunk))
                if any(d not in ends for d in deps):
                    break
                start = max([free[s], *(ends[d] for d in deps)])
                end = start + (NOMINAL_FORWARD if isinstance(op, Forward) else NOMINAL_BACKWARD)
                ends[(s, type(op), op.micro, op.chunk)] = end
                times[s].append((start, end))
                free[s] = end
                pos[s] += 1
                remaining -= 1
                moved = True
        if not moved:
            raise RuntimeError(f"compute orders cannot progress: stuck at {[o[p] for o, p in zip(orders, pos)]}")
    return times


def _busy_until(spans: list[tuple[Fraction, Fraction]], t: Fraction) -> Fraction | None:
    """End of the op running strictly across ``t`` on one stage (spans sorted, disjoint), else None."""
    i = bisect.bisect_left(spans, (t, t)) - 1  # last span starting before t
    if i >= 0 and spans[i][0] < t < spans[i][1]:
        return spans[i][1]
    return None


def weave_exchanges(orders: Sequence[Sequence], *, stages: int, chunks: int) -> list[list[Instruction]]:
    """Every stage's full stream: compute ops, exchanges, then ReduceGrads and OptimizerStep."""
    times = _timeline(orders, stages=stages, chunks=chunks)
    where = {(s, type(op), op.micro, op.chunk): i for s in range(stages) for i, op in enumerate(orders[s])}
    # exchanges[s][T] = list of (message key, op)
    exchanges: list[dict[Fraction, list[tuple[tuple, P2POp]]]] = [{} for _ in range(stages)]
    for t in range(stages):
        for j, op in enumerate(orders[t]):
            src = _producer(op, stage=t, stages=stages, chunks=chunks)
            if src is None:
                continue
            s, src_chunk = src
            produced_at = times[s][where[(s, type(op), op.micro, src_chunk)]][1]
            moment = produced_at
            while True:  # first moment both peers are between ops
                later = _busy_until(times[t], moment) or _busy_until(times[s], moment)
                if later is None:
                    break
                moment = later
            if moment > times[t][j][0]:
                raise RuntimeError(f"no common boundary for {op} on stage {t} (from stage {s})")
            is_fwd = isinstance(op, Forward)
            key = ("activation" if is_fwd else "grad", op.micro, _model_chunk(src_chunk, s, stages))
            send = (SendActivation if is_fwd else SendGrad)(op.micro, src_chunk, t)
            recv = (RecvActivation if is_fwd else RecvGrad)(op.micro, op.chunk, s)
            exchanges[s].setdefault(moment, []).append((key, send))
            exchanges[t].setdefault(moment, []).append((key, recv))

    streams: list[list[Instruction]] = []
    for s in range(stages):
        items: list[tuple[Fraction, int, Instruction]] = [(times[s][i][0], 1, op) for i, op in enumerate(orders[s])]
        for moment, ops in exchanges[s].items():
            # Sorted by message (and send before receive): the same order on both ends of a channel.
            ordered = sorted(ops, key=lambda kv: (kv[0], type(kv[1]).__name__))
            items.append((moment, 0, Exchange(tuple(op for _, op in ordered))))
        items.sort(key=lambda item: (item[0], item[1]))
        streams.append([instr for _, _, instr in items] + [ReduceGrads(), OptimizerStep()])
    return streams
