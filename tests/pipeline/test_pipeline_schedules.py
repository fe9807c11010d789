"""Schedules as data, checked without processes by executing every stage's stream together
(engine.pipeline.simulate: rendezvous transport, FIFO channels, data dependencies)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from engine.errors import ConfigError
from engine.pipeline.schedules import (
    Backward,
    Exchange,
    Forward,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    SendActivation,
    SendGrad,
    build_all,
    schedule,
)
from engine.pipeline.simulate import ScheduleError, simulate

P_RANGE = range(1, 9)
M_RANGE = range(1, 33)


def _layouts():
    for p in P_RANGE:
        for m in M_RANGE:
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            if p >= 2 and m % p == 0:
                for v in range(1, 5):
                    yield "interleaved", p, m, v


def _forward_before_backward(stream) -> bool:
    seen = set()
    for instr in stream:
        if isinstance(instr, Forward):
            seen.add((instr.micro, instr.chunk))
        elif isinstance(instr, Backward) and (instr.micro, instr.chunk) not in seen:
            return False
    return True


def test_every_layout_runs_without_deadlock_and_with_the_formula_bubble() -> None:
    """p <= 8, m <= 32, v <= 4: no deadlock or mismatched message (simulate raises), each micro-batch's
    forward precedes its backward on each stage, every (micro, chunk) runs exactly once each way, and with
    equal forward and backward times the bubble is (p-1)/m, or (p-1)/(v*m) interleaved."""
    count = 0
    for name, p, m, v in _layouts():
        streams = build_all(name, stages=p, microbatches=m, virtual_stages=v)
        result = simulate(streams, virtual_stages=v, fwd_time=1, bwd_time=1)
        for s, stream in enumerate(streams):
            assert _forward_before_backward(stream), (name, p, m, v, s)
            fwd = sorted((i.micro, i.chunk) for i in stream if isinstance(i, Forward))
            assert fwd == [(mi, c) for mi in range(m) for c in range(v)], (name, p, m, v, s)
            assert stream[-2:] == [ReduceGrads(), OptimizerStep()]
        assert result.bubble == Fraction(p - 1, m * v), (name, p, m, v)
        assert set(result.stage_bubble) == {Fraction(p - 1, m * v)}, (name, p, m, v)
        if name == "1f1b":
            assert max(result.peak_in_flight) <= p, (p, m)
            assert result.peak_in_flight[0] == min(p, m)
        if name == "gpipe":
            assert result.peak_in_flight == [m] * p
        count += 1
    assert count == 8 * 32 * 2 + sum(4 for p in range(2, 9) for m in M_RANGE if m % p == 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_is_exact_with_unequal_forward_and_backward(name: str) -> None:
    for p, m in [(2, 3), (4, 8), (8, 32), (5, 7)]:
        result = simulate(build_all(name, stages=p, microbatches=m), fwd_time=1, bwd_time=2)
        assert result.bubble == Fraction(p - 1, m)
        assert result.makespan == (m + p - 1) * 3


def test_1f1b_two_stages_exact_stream() -> None:
    """The instruction stream itself: warmup, steady 1F1B and cooldown, with paired exchanges."""
    s0 = list(schedule("1f1b", stages=2, microbatches=3, stage=0))
    assert [type(i).__name__ for i in s0 if not isinstance(i, Exchange)] == [
        "Forward",
        "Forward",
        "Backward",
        "Forward",
        "Backward",
        "Backward",
        "ReduceGrads",
        "OptimizerStep",
    ]
    exchanges = [i.ops for i in s0 if isinstance(i, Exchange)]
    assert exchanges[0] == (SendActivation(0, 0, 1),)
    s1 = list(schedule("1f1b", stages=2, microbatches=3, stage=1))
    assert s1[0] == Exchange((RecvActivation(0, 0, 0),))


def test_mismatched_streams_are_caught() -> None:
    # stage 1 expects micro-batch 1 first but stage 0 sends micro-batch 0 first: a runtime would mix them up
    streams = [
        [Forward(0), Forward(1), Exchange((SendActivation(0, 0, 1),)), Exchange((SendActivation(1, 0, 1),))],
        [Exchange((RecvActivation(1, 0, 0),)), Exchange((RecvActivation(0, 0, 0),))],
    ]
    with pytest.raises(
        ScheduleError,
        match=r"stages 0->1: sent \('activation', 0, 0\) but the receiver expected "
        r"\('activation', 1, 0\)",
    ):
        simulate(streams)


def test_deadlock_is_caught() -> None:
    # stage 0 waits for a gradient before sending the activation that stage 1 needs to produce it
    streams = [
        [Forward(0), Exchange((RecvGrad(0, 0, 1),)), Exchange((SendActivation(0, 0, 1),)), Backward(0)],
        [Exchange((RecvActivation(0, 0, 0),)), Forward(0), Backward(0), Exchange((SendGrad(0, 0, 0),))],
    ]
    with pytest.raises(ScheduleError, match=r"^deadlock: stage 0 waits at Exchange\(ops=\(RecvGrad"):
        simulate(streams)


def test_interleaved_refuses_m_not_multiple_of_p() -> None:
    with pytest.raises(ConfigError) as err:
        build_all("interleaved", stages=4, microbatches=6, virtual_stages=2)
    assert str(err.value) == (
        "interleaved 1F1B needs the number of micro-batches (gradient_accumulation_steps=6) to be a multiple "
        "of parallel.pipeline=4 (hint: use 8 micro-batches, or the 1f1b schedule)"
    )


def test_virtual_stages_need_interleaved_and_unknown_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^parallel.virtual_stages=2 needs the interleaved schedule, not '1f1b'"):
        build_all("1f1b", stages=2, microbatches=4, virtual_stages=2)
    with pytest.raises(ConfigError, match=r"^parallel.pipeline_schedule: unknown schedule 'zb'"):
        build_all("zb", stages=2, microbatches=4)


def test_overlapped_p2p_reaches_the_interleaved_formula_with_slower_backward() -> None:
    """Waiting for an exchange only when its data is needed (the executor's default) never deadlocks where
    waiting at once does not, and removes the rendezvous stalls that the unit-time pairing causes with
    backward = 2 x forward: the interleaved bubble is (p-1)/(v*m) again (blocking: 3/8 for p=4, m=8, v=2)."""
    blocking = simulate(
        build_all("interleaved", stages=4, microbatches=8, virtual_stages=2),
        virtual_stages=2,
        fwd_time=1,
        bwd_time=2,
        wait="post",
    )
    assert blocking.bubble == Fraction(3, 8)
    for name, p, m, v in _layouts():
        if (name != "interleaved" and m % 4) or (name == "interleaved" and m > 16):
            continue  # a sample of the non-interleaved layouts; the full ranges run blocking above
        streams = build_all(name, stages=p, microbatches=m, virtual_stages=v)
        for fwd, bwd in ((1, 1), (1, 2)):
            result = simulate(streams, virtual_stages=v, fwd_time=fwd, bwd_time=bwd, wait="need")
            assert result.bubble == Fraction(p - 1, m * (v if name == "interleaved" else 1)), (name, p, m, v, bwd)
