"""``python -m engine.quickstart``: the whole recipe on a corpus every Python install carries.

A SentencePiece tokenizer and token shards from the Python standard library's sources, a small GPT trained
for a few minutes, then its loss, perplexity, a sample and where the plot, metrics and checkpoint are
(``engine/training/quickstart.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.errors import cli_main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart", help="where data, logs and checkpoints go")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400: a few minutes on CPU)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    args = p.parse_args(argv)
    from engine.training.quickstart import run_quickstart

    return run_quickstart(
        args.out, steps=args.steps, vocab_size=args.vocab_size, max_files=args.max_files, workers=args.workers
    )


if __name__ == "__main__":
    cli_main(main)
