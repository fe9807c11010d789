"""``python -m engine.bench pipeline``: simulate a pipeline schedule and report its bubble.

    python -m engine.bench pipeline --stages 4 --microbatches 8 --schedule 1f1b
    python -m engine.bench pipeline --stages 4 --microbatches 8 --virtual 2 --schedule interleaved --png t.png

Prints a text timeline per stage (digits: forward of micro-batch n mod 10; letters: its backward; '.':
idle), the bubble fraction (idle time / ideal compute time, as in the Megatron-LM paper) next to the
formula, and the peak number of (micro-batch, chunk) activations each stage holds at once.
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Sequence
from fractions import Fraction

from engine.errors import ConfigError
from engine.pipeline.schedules import SCHEDULE_NAMES, Backward, build_all
from engine.pipeline.simulate import SimResult, simulate

MAX_WIDTH = 160  # characters of timeline; longer runs are drawn coarser


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
    ap.add_argument("--png", default=None, help="also draw the timeline to this PNG (matplotlib)")
    ap.add_argument("--measure", action="store_true", help="measure a real CPU run (needs the executor)")
    return ap


def formula(schedule: str, *, stages: int, microbatches: int, virtual: int) -> Fraction:
    """The textbook bubble: (p-1)/m, divided by v for interleaved 1F1B."""
    return Fraction(stages - 1, microbatches * (virtual if schedule == "interleaved" else 1))


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
            mark = (
                string.ascii_lowercase[sp.op.micro % 26]
                if isinstance(sp.op, Backward)
                else str(sp.op.micro % 10)
            )
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
            backward = isinstance(sp.op, Backward)
            shade = 0.95 - 0.5 * sp.op.chunk / max(result.virtual_stages - 1, 1)
            color = (shade, 0.3, 0.3) if backward else (0.3, 0.4, shade)
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
    ax.set_xlabel("time (blue: forward, red: backward; darker = later chunk)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.measure:
        raise ConfigError(
            "--measure is not yet available: it needs the pipeline executor",
            hint="run without --measure for the simulated timeline",
        )
    for key, value in (
        ("--stages", args.stages),
        ("--microbatches", args.microbatches),
        ("--virtual", args.virtual),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in (("--fwd-time", args.fwd_time), ("--bwd-time", args.bwd_time)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    schedule = args.schedule or ("interleaved" if args.virtual > 1 else "1f1b")
    streams = build_all(
        schedule, stages=args.stages, microbatches=args.microbatches, virtual_stages=args.virtual
    )
    result = simulate(streams, virtual_stages=args.virtual, fwd_time=args.fwd_time, bwd_time=args.bwd_time)
    expected = formula(schedule, stages=args.stages, microbatches=args.microbatches, virtual=args.virtual)
    title = (
        f"{schedule}: p={args.stages}, m={args.microbatches}, v={args.virtual}, "
        f"fwd {args.fwd_time}, bwd {args.bwd_time} per stage"
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
    return 0
