"""``python -m engine.prepare``: text/JSONL/parquet -> SentencePiece tokens in Megatron ``.bin/.idx`` shards.

The options and what they do: ``engine/data/prepare.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.errors import cli_main


def main(argv: Sequence[str] | None = None) -> int:
    from engine.data.prepare import build_parser, run

    return run(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    cli_main(main)
