"""``python -m engine.export --checkpoint DIR --out DIR [--dtype fp32|bf16|fp16]``

Writes a transformers-loadable model directory from a checkpoint of any layout (``engine/hf/export.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.errors import cli_main
from engine.hf.export import DTYPES, export


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a step_XXXXXXXX directory or a train.save_dir")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype in model.safetensors")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: from the run's data)")
    args = p.parse_args(argv)
    config = export(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer)
    print(f"wrote {config['architectures'][0]} ({args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    cli_main(main)
