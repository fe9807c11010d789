"""ZB-H1 as data: valid streams for p <= 8, m <= 32, a third of 1F1B's bubble, 1F1B's peak memory."""

from __future__ import annotations

from fractions import Fraction

from engine.pipeline.schedules import Backward, BackwardWeight, Forward, build_all
from engine.pipeline.simulate import simulate
from engine.pipeline.zero_bubble import zb_h1_order


def test_zb_h1_runs_every_layout_with_a_third_of_the_1f1b_bubble() -> None:
    """No deadlock or mismatch (simulate raises), F before B before W for every micro-batch on every stage,
    at most p activations alive per stage (1F1B's peak, from F to W), and with F, B and W of equal time
    (bwd = 2 x fwd) a bubble of exactly (p-1)/(3m) once m >= p; blocking or overlapped p2p alike."""
    for p in range(1, 9):
        for m in range(1, 33):
            streams = build_all("zb-h1", stages=p, microbatches=m)
            for stream in streams:
                seen: dict[int, str] = {}
                for instr in stream:
                    if isinstance(instr, Forward | Backward | BackwardWeight):
                        kind = type(instr).__name__[0] if not isinstance(instr, BackwardWeight) else "W"
                        seen[instr.micro] = seen.get(instr.micro, "") + kind
                assert seen == dict.fromkeys(range(m), "FBW"), (p, m)
            for wait in ("post", "need"):
                result = simulate(streams, fwd_time=1, bwd_time=2, wait=wait)
                assert max(result.peak_in_flight) <= p, (p, m)
                if m >= p:  # 1F1B's is (p-1)/m (test_pipeline_schedules)
                    assert result.bubble == Fraction(p - 1, 3 * m), (p, m, wait)


def test_zb_h1_stream_lags_weight_passes_by_the_stage_index() -> None:
    names = {Forward: "F", Backward: "B", BackwardWeight: "W"}
    order = ["".join((names[type(op)], str(op.micro))) for op in zb_h1_order(stages=3, microbatches=4, stage=1)]
    # 1F1B's stage 1 of 3 (one warmup forward), with each W one micro-batch behind its B
    assert order == ["F0", "F1", "B0", "F2", "B1", "W0", "F3", "B2", "W1", "B3", "W2", "W3"]
