"""``python -m engine.plot METRICS.jsonl [--out loss.png]``: loss, lr, grad-norm and loss-scale curves."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.errors import cli_main
from engine.metrics.plot import plot, read_metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.plot", description=__doc__)
    p.add_argument("metrics", help="path to metrics.jsonl")
    p.add_argument("--out", default="loss.png")
    args = p.parse_args(argv)
    print(plot(read_metrics(args.metrics), args.out))
    return 0


if __name__ == "__main__":
    cli_main(main)
