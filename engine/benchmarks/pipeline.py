"""``python -m engine.bench pipeline``: simulate a pipeline schedule and report its bubble.

    python -m engine.bench pipeline --stages 4 --microbatches 8 --schedule 1f1b
    python -m engine.bench pipeline --stages 4 --microbatches 8 --virtual 2 --schedule interleaved --png t.png
    python -m engine.bench pipeline --stages 2 --microbatches 8 --schedule 1f1b --measure

Prints a text timeline per stage (digits: forward of micro-batch n mod 10; letters: its backward, or with
zb-h1 its input-gradient pass and, upper case, its weight-gradient pass; '.': idle), the bubble fraction
(idle time / ideal compute time, as in the Megatron-LM paper) next to the formula, and the peak number of
(micro-batch, chunk) activations each stage holds at once.

``--measure`` also runs the real executor (engine/pipeline/executor.py) on ``--stages`` CPU gloo processes
(one thread each) with a small GPT-2 (``--layers-per-chunk`` layers per model chunk), and prints the
measured timeline of the median step, its idle fraction, and the simulator's bubble for the measured
forward/backward times next to the formula. Other processes sharing the cores inflate it.
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Sequence
from fractions import Fraction

from engine.benchmarks.pipeline_measure import MeasureOptions, Trace, run_measurement, step_measure
from engine.errors import ConfigError
from engine.pipeline.schedules import SCHEDULE_NAMES, Backward, BackwardWeight, Forward, build_all
from engine.pipeline.simulate import SimResult, Span, simulate

MAX_WIDTH = 160  # characters of timeline; longer runs are drawn coarser
OPS = {"F": Forward, "B": Backward, "W": BackwardWeight}  # trace kinds of the executor


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine.bench pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, required=True, help="pipeline stages p")
    ap.add_argument("--microbatches", type=int, required=True, help="micro-batches m per step")
    ap.add_argument("--virtual", type=int, default=1, help="virtual stages v per device (interleaved)")
    ap.add_argument(
        "--schedule",
        choices=SCHEDULE_NAMES,
        default=None,
        help="default: interleaved when --virtual > 1, else 1f1b",
    )
    ap.add_argument("--fwd-time", type=Fraction, default=Fraction(1), help="forward time of one stage")
    ap.add_argument("--bwd-time", type=Fraction, default=Fraction(1), help="backward time of one stage")
    ap.add_argument(
        "--blocking-p2p",
        action="store_true",
        help="wait for each exchange when it is posted (default: when its data is needed, as the executor does)",
    )
    ap.add_argument("--png", default=None, help="also draw the timeline to this PNG (matplotlib)")
    ap.add_argument("--measure", action="store_true", help="also measure the real executor on CPU gloo ranks")
    ap.add_argument("--layers-per-chunk", type=int, default=2, help="--measure: layers per model chunk")
    ap.add_argument("--d-model", type=int, default=128, help="--measure: hidden size")
    ap.add_argument("--seq-len", type=int, default=64, help="--measure: tokens per sample")
    ap.add_argument("--micro-batch", type=int, default=4, help="--measure: samples per micro-batch")
    ap.add_argument("--steps", type=int, default=5, help="--measure: measured steps (after 2 warmup steps)")
    return ap


def formula(schedule: str, *, stages: int, microbatches: int, virtual: int) -> Fraction:
    """The textbook bubble: (p-1)/m, divided by v for interleaved 1F1B, by 3 for ZB-H1 (which assumes
    forward, input-gradient and weight-gradient passes of equal time, i.e. --bwd-time 2)."""
    divisor = virtual if schedule == "interleaved" else 3 if schedule == "zb-h1" else 1
    return Fraction(stages - 1, microbatches * divisor)


def render_text(result: SimResult) -> list[str]:
    """One line per stage; each character is one time slot."""
    durations = [sp.end - sp.start for spans in result.spans for sp in spans]
    slot = min(durations) if durations else Fraction(1)
    if result.makespan / slot > MAX_WIDTH:
        slot = result.makespan / MAX_WIDTH
    width = int(-(-result.makespan // slot))  # ceil
    lines = []
    for s, spans in enumerate(result.spans):
        row = ["."] * width
        for sp in spans:
            if isinstance(sp.op, Backward):
                mark = string.ascii_lowercase[sp.op.micro % 26]
            elif isinstance(sp.op, BackwardWeight):
                mark = string.ascii_uppercase[sp.op.micro % 26]
            else:
                mark = str(sp.op.micro % 10)
            for i in range(int(sp.start // slot), max(int(sp.start // slot) + 1, int(sp.end // slot))):
                row[min(i, width - 1)] = mark
        lines.append(f"stage {s:>2} |{''.join(row)}|")
    return lines


def draw_png(result: SimResult, path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - optional, only for --png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(12, 0.5 * result.stages + 1.5))
    for s, spans in enumerate(result.spans):
        for sp in spans:
            shade = 0.95 - 0.5 * sp.op.chunk / max(result.virtual_stages - 1, 1)
            if isinstance(sp.op, Backward):
                color = (shade, 0.3, 0.3)
            elif isinstance(sp.op, BackwardWeight):
                color = (0.3, shade, 0.4)
            else:
                color = (0.3, 0.4, shade)
            ax.broken_barh([(float(sp.start), float(sp.end - sp.start))], (s - 0.4, 0.8), color=color)
            ax.text(
                float(sp.start + sp.end) / 2,
                s,
                str(sp.op.micro),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
            )
    ax.set_yticks(range(result.stages), [f"stage {s}" for s in range(result.stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (blue: forward, red: backward, green: weight gradients; darker = later chunk)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key, value in (
        ("--stages", args.stages),
        ("--microbatches", args.microbatches),
        ("--virtual", args.virtual),
        ("--layers-per-chunk", args.layers_per_chunk),
        ("--d-model", args.d_model),
        ("--seq-len", args.seq_len),
        ("--micro-batch", args.micro_batch),
        ("--steps", args.steps),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in (("--fwd-time", args.fwd_time), ("--bwd-time", args.bwd_time)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    schedule = args.schedule or ("interleaved" if args.virtual > 1 else "1f1b")
    streams = build_all(schedule, stages=args.stages, microbatches=args.microbatches, virtual_stages=args.virtual)
    wait = "post" if args.blocking_p2p else "need"
    result = simulate(streams, virtual_stages=args.virtual, fwd_time=args.fwd_time, bwd_time=args.bwd_time, wait=wait)
    expected = formula(schedule, stages=args.stages, microbatches=args.microbatches, virtual=args.virtual)
    title = (
        f"{schedule}: p={args.stages}, m={args.microbatches}, v={args.virtual}, "
        f"fwd {args.fwd_time}, bwd {args.bwd_time} per stage" + (", blocking p2p" if args.blocking_p2p else "")
    )
    print(title)
    print("\n".join(render_text(result)))
    print(
        f"bubble (idle / ideal): {result.bubble} = {float(result.bubble):.4f}   formula: {expected} = "
        f"{float(expected):.4f}"
    )
    print(f"makespan: {result.makespan} (ideal {result.busy[0] if result.busy else 0})")
    print(
        f"peak in-flight activations per stage: {result.peak_in_flight}"
        + (f" (chunk activations, each 1/{args.virtual} of a stage's)" if args.virtual > 1 else "")
    )
    if args.png:
        draw_png(result, args.png, title)
        print(f"wrote {args.png}")
    if args.measure:
        if args.stages < 2:
            raise ConfigError(f"--stages {args.stages}: --measure needs at least 2 pipeline stages")
        report_measurement(args, schedule, expected)
    return 0


def _fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10**6)


def measured_result(stage_traces: list[Trace], *, virtual: int) -> SimResult:
    """A measured step as a SimResult (times in ms from the first op), to draw like a simulated one."""
    compute = [[span for span in trace if span[0] in "FBW"] for trace in stage_traces]
    t0 = min(spans[0][3] for spans in compute)
    spans = [
        [Span(_fraction((s - t0) * 1e3), _fraction((e - t0) * 1e3), OPS[k](m, c)) for k, m, c, s, e in stage]
        for stage in compute
    ]
    busy = [sum((sp.end - sp.start for sp in stage), Fraction(0)) for stage in spans]
    return SimResult(
        stages=len(spans),
        virtual_stages=virtual,
        spans=spans,
        makespan=max(stage[-1].end for stage in spans),
        busy=busy,
        peak_in_flight=[],
    )


def report_measurement(args, schedule: str, expected: Fraction) -> None:
    opts = MeasureOptions(
        schedule=schedule,
        stages=args.stages,
        microbatches=args.microbatches,
        virtual=args.virtual,
        layers_per_chunk=args.layers_per_chunk,
        d_model=args.d_model,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        steps=args.steps,
        overlap_p2p=not args.blocking_p2p,
    )
    traces = run_measurement(opts)
    per_step = [[traces[s][i] for s in range(args.stages)] for i in range(args.steps)]
    measures = [step_measure(step) for step in per_step]
    order = sorted(range(len(measures)), key=lambda i: measures[i].bubble)
    median = order[len(order) // 2]
    m = measures[median]
    print(
        f"\nmeasured: {args.stages} gloo ranks, gpt2 {opts.layers_per_chunk} layers/chunk, d_model {opts.d_model}, "
        f"seq {opts.seq_len}, micro-batch {opts.micro_batch}; median of {args.steps} steps (ms):"
    )
    print("\n".join(render_text(measured_result(per_step[median], virtual=args.virtual))))
    sim = simulate(
        build_all(schedule, stages=args.stages, microbatches=args.microbatches, virtual_stages=args.virtual),
        virtual_stages=args.virtual,
        fwd_time=_fraction(m.fwd_time * args.virtual),
        bwd_time=_fraction((m.bwd_time + m.wgrad_time) * args.virtual),
        wait="post" if args.blocking_p2p else "need",
        wgrad_share=_fraction(m.wgrad_time / (m.bwd_time + m.wgrad_time)),
    )
    split = f", weight gradients {m.wgrad_time * 1e3:.2f} ms" if m.wgrad_time else ""
    print(
        f"measured forward {m.fwd_time * 1e3:.2f} ms, backward {m.bwd_time * 1e3:.2f} ms{split} per chunk; "
        f"step {m.makespan * 1e3:.1f} ms"
    )
    print(
        f"measured idle fraction: {m.bubble:.4f} (steps: {', '.join(f'{x.bubble:.3f}' for x in measures)})   "
        f"simulated at these op times: {float(sim.bubble):.4f}   formula: {expected} = {float(expected):.4f}"
    )
