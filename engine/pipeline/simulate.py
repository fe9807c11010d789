"""Execute every stage's instruction stream together, with op times, in exact arithmetic.

This is both the schedules' validator and the bubble simulator:

- **Transport model.** An ``Exchange`` is posted at once and the stage waits until every op in it has
  been matched; a send is matched only when the peer has *posted* the matching receive (rendezvous, the
  strictest transport: what NCCL does for large tensors). Messages between an ordered pair of stages
  match first-in first-out, and the matched pair must name the same (kind, micro-batch, model chunk),
  otherwise a runtime would silently feed the wrong tensor: ``ScheduleError``. A state where no stage
  can move but some are unfinished is a deadlock: ``ScheduleError``.
- **Data dependencies.** A Forward needs its input received (or to be model chunk 0); a Backward needs
  its own Forward and its output gradient (or to be the last model chunk); a ``BackwardWeight`` its own
  Backward; a send needs the op that produces it. Violations raise ``ScheduleError``.
- **Times.** With ``v`` chunks per device a chunk's forward takes ``fwd_time / v`` (a device's work per
  micro-batch is fixed; interleaving cuts it finer). Communication takes ``comm_time`` per exchange.
  Times are ``Fraction`` so bubble fractions compare exactly with the formulas.

Bubble, as in Narayanan et al. 2021 (Megatron-LM): idle time over ideal time. Per stage,
``(makespan - busy) / busy``; overall, summed over stages. It is exactly ``(p-1)/m`` for GPipe and
1F1B with any forward/backward times, and ``(p-1)/(v*m)`` for interleaved 1F1B when forward and
backward take equal time. With backward = 2 x forward the interleaved streams (paired on a unit-time
timeline, see ``exchanges.py``) stall at rendezvous points if every exchange is waited on when posted
(``wait="post"``: 3/8 instead of 3/16 for p=4, m=8, v=2), and reach ``(p-1)/(v*m)`` again when an
exchange is waited on only when its data is needed (``wait="need"``, the executor's default).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from engine.pipeline.schedules import (
    Backward,
    BackwardWeight,
    Compute,
    Exchange,
    Forward,
    Instruction,
    P2POp,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)


class ScheduleError(Exception):
    """A schedule that a runtime could not execute (a bug in a schedule, not a user error)."""


@dataclass(frozen=True)
class Span:
    """One compute op on one stage, ``[start, end)``."""

    start: Fraction
    end: Fraction
    op: Compute


@dataclass
class SimResult:
    stages: int
    virtual_stages: int
    spans: list[list[Span]]  # per stage, in execution order
    makespan: Fraction
    busy: list[Fraction]  # compute time per stage
    peak_in_flight: list[int]  # per stage: max (micro, chunk) activations held at once

    @property
    def stage_bubble(self) -> list[Fraction]:
        return [(self.makespan - b) / b if b else Fraction(0) for b in self.busy]

    @property
    def bubble(self) -> Fraction:
        total = sum(self.busy, Fraction(0))
        return (self.makespan * self.stages - total) / total if total else Fraction(0)


@dataclass
class _Posted:
    key: tuple[str, int, int]  # (kind, micro, producing model chunk)
    time: Fraction
    matched_at: Fraction | None = None


@dataclass
class _Stage:
    stream: Sequence[Instruction]
    index: int = 0
    clock: Fraction = Fraction(0)
    waiting: list[_Posted] = field(default_factory=list)
    posted: list[_Posted] = field(default_factory=list)  # wait="need": posted, not yet waited on
    exchange_of: dict[tuple[str, int, int], list[_Posted]] = field(default_factory=dict)  # recv key -> batch
    received: set[tuple[str, int, int]] = field(default_factory=set)
    forwarded: set[tuple[int, int]] = field(default_factory=set)
    backwarded: set[tuple[int, int]] = field(default_factory=set)
    weighted: set[tuple[int, int]] = field(default_factory=set)  # BackwardWeight done (split backward)
    spans: list[Span] = field(default_factory=list)
    peak: int = 0

    @property
    def done(self) -> bool:
        return (
            self.index >= len(self.stream) and not self.waiting and all(w.matched_at is not None for w in self.posted)
        )


def _message(op: P2POp, *, stage: int, stages: int) -> tuple[tuple[str, int, int], int, int]:
    """(key, src, dst) of the message ``op`` sends or receives; key names the producing model chunk."""
    model_chunk = op.chunk * stages + stage
    if isinstance(op, SendActivation):
        return ("activation", op.micro, model_chunk), stage, op.peer
    if isinstance(op, SendGrad):
        return ("grad", op.micro, model_chunk), stage, op.peer
    if isinstance(op, RecvActivation):
        return ("activation", op.micro, model_chunk - 1), op.peer, stage
    return ("grad", op.micro, model_chunk + 1), op.peer, stage


def _needed(op: Forward | Backward, *, stage: int, stages: int, last_chunk: int) -> tuple[str, int, int] | None:
    """Key of the message ``op`` consumes (None for model chunk 0's forward and the last one's backward)."""
    model_chunk = op.chunk * stages + stage
    if isinstance(op, Forward):
        return ("activation", op.micro, model_chunk - 1) if model_chunk > 0 else None
    return ("grad", op.micro, model_chunk + 1) if model_chunk < last_chunk else None


def simulate(
    streams: Sequence[Sequence[Instruction]],
    *,
    virtual_stages: int = 1,
    fwd_time: Fraction | int | str = 1,
    bwd_time: Fraction | int | str = 2,
    comm_time: Fraction | int | str = 0,
    forward_only: bool = False,
    wait: str = "post",
    wgrad_share: Fraction | int | str = Fraction(1, 2),
) -> SimResult:
    """Run ``streams[s]`` on stage ``s`` for every stage at once; see the module docstring.

    ``forward_only``: evaluation streams, where forwards have no backwards. ``wait``: ``"post"`` waits for
    a whole exchange when it is posted; ``"need"`` posts it and goes on, and waits for the exchange holding
    a received tensor only when a compute op needs that tensor (and for every exchange at the end), the
    runtime's ``overlap_p2p`` mode (Megatron-LM's overlapped p2p). ``wgrad_share``: for streams with a
    split backward (``BackwardWeight``, zero-bubble schedules), the part of ``bwd_time`` that is weight
    gradients (W); the input-gradient part (B) takes the rest. Half by default: with bwd = 2 x fwd, F, B
    and W take equal time, as in the zero-bubble paper."""
    if wait not in ("post", "need"):
        raise ValueError(f"wait must be 'post' or 'need', got {wait!r}")
    p, v = len(streams), virtual_stages
    t_fwd, t_bwd, t_comm = Fraction(fwd_time) / v, Fraction(bwd_time) / v, Fraction(comm_time)
    split = any(isinstance(i, BackwardWeight) for stream in streams for i in stream)
    t_w = t_bwd * Fraction(wgrad_share) if split else Fraction(0)
    last_chunk = p * v - 1
    stages = [_Stage(stream) for stream in streams]
    sends: dict[tuple[int, int], deque[_Posted]] = {}
    recvs: dict[tuple[int, int], deque[_Posted]] = {}

    def run_compute(s: int, st: _Stage, op: Compute) -> None:
        if not 0 <= op.chunk < v:
            raise ScheduleError(f"stage {s}: {op} names a chunk outside [0, {v})")
        model_chunk, mc = op.chunk * p + s, (op.micro, op.chunk)
        if isinstance(op, BackwardWeight):
            if mc not in st.backwarded or mc in st.weighted:
                raise ScheduleError(f"stage {s}: {op} runs before its Backward, or twice")
            st.weighted.add(mc)
            duration = t_w
        elif isinstance(op, Forward):
            if model_chunk > 0 and ("activation", op.micro, model_chunk - 1) not in st.received:
                raise ScheduleError(f"stage {s}: {op} runs before its input activation arrived")
            if mc in st.forwarded:
                raise ScheduleError(f"stage {s}: {op} runs twice")
            st.forwarded.add(mc)
            duration = t_fwd
        else:
            if mc not in st.forwarded:
                raise ScheduleError(f"stage {s}: {op} runs before its forward")
            if model_chunk < last_chunk and ("grad", op.micro, model_chunk + 1) not in st.received:
                raise ScheduleError(f"stage {s}: {op} runs before its output gradient arrived")
            if mc in st.backwarded:
                raise ScheduleError(f"stage {s}: {op} runs twice")
            st.backwarded.add(mc)
            duration = t_bwd - t_w
        st.spans.append(Span(st.clock, st.clock + duration, op))
        st.clock += duration
        # activations live until the backward that frees them: W when the backward is split
        st.peak = max(st.peak, len(st.forwarded) - len(st.weighted if split else st.backwarded))

    def post(s: int, st: _Stage, ex: Exchange) -> None:
        batch: list[_Posted] = []
        for op in ex.ops:
            key, src, dst = _message(op, stage=s, stages=p)
            if not (0 <= op.peer < p) or op.peer == s:
                raise ScheduleError(f"stage {s}: {op} names an invalid peer")
            posted = _Posted(key, st.clock)
            if isinstance(op, SendActivation | SendGrad):
                done = st.forwarded if key[0] == "activation" else st.backwarded
                if (op.micro, op.chunk) not in done:
                    raise ScheduleError(f"stage {s}: {op} sends an output not yet computed")
                sends.setdefault((src, dst), deque()).append(posted)
            else:
                recvs.setdefault((src, dst), deque()).append(posted)
            if wait == "post":
                st.waiting.append(posted)
            else:
                st.posted.append(posted)
                batch.append(posted)
                if isinstance(op, RecvActivation | RecvGrad):
                    st.exchange_of[key] = batch

    progress = True
    while progress:
        progress = False
        for s, st in enumerate(stages):  # run every unblocked stage up to its next exchange
            while not st.waiting and st.index < len(st.stream):
                instr = st.stream[st.index]
                if wait == "need" and isinstance(instr, Forward | Backward):
                    batch = st.exchange_of.get(_needed(instr, stage=s, stages=p, last_chunk=last_chunk))
                    if batch is not None:
                        if any(w.matched_at is None for w in batch):
                            break  # blocked until the exchange holding this op's input completes
                        st.clock = max(st.clock, *(w.matched_at for w in batch))
                st.index += 1
                progress = True
                if isinstance(instr, Forward | Backward | BackwardWeight):
                    run_compute(s, st, instr)
                elif isinstance(instr, Exchange):
                    post(s, st, instr)
        for pair, queue in sends.items():  # match heads of each channel, FIFO
            other = recvs.get(pair, deque())
            while queue and other:
                snd, rcv = queue.popleft(), other.popleft()
                if snd.key != rcv.key:
                    raise ScheduleError(
                        f"stages {pair[0]}->{pair[1]}: sent {snd.key} but the receiver expected {rcv.key}"
                    )
                snd.matched_at = rcv.matched_at = max(snd.time, rcv.time) + t_comm
                stages[pair[1]].received.add(rcv.key)
                progress = True
        for st in stages:  # a stage moves on once its whole exchange is matched
            if st.waiting and all(w.matched_at is not None for w in st.waiting):
                st.clock = max(st.clock, *(w.matched_at for w in st.waiting))
                st.waiting = []
                progress = True
    stuck = [s for s, st in enumerate(stages) if not st.done]
    if stuck:
        detail = "; ".join(f"stage {s} waits at {stages[s].stream[stages[s].index - 1]}" for s in stuck)
        raise ScheduleError(f"deadlock: {detail}")
    for s, st in enumerate(stages):
        if split and st.weighted != st.backwarded:
            raise ScheduleError(f"stage {s}: backwards without weight passes: {sorted(st.backwarded - st.weighted)}")
        if st.forwarded != st.backwarded and not forward_only:
            raise ScheduleError(f"stage {s}: forwards without backwards: {sorted(st.forwarded - st.backwarded)}")
    makespan = max((st.spans[-1].end for st in stages if st.spans), default=Fraction(0))
    return SimResult(
        stages=p,
        virtual_stages=v,
        spans=[st.spans for st in stages],
        makespan=makespan,
        busy=[sum((sp.end - sp.start for sp in st.spans), Fraction(0)) for st in stages],
        peak_in_flight=[st.peak for st in stages],
    )
