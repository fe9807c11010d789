"""``python -m engine.bench SUITE [options]``: benchmarks that print ratios measured side by side.

Each suite lives in ``engine/benchmarks/<suite>.py`` and exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from engine.errors import ConfigError, cli_main

SUITES = {
    "data": "tokenizer, prepare, sample-index and loader throughput",
    "pipeline": "pipeline schedule simulator (bubble, in-flight activations)",
    "kernels": "Triton kernels vs torch equivalents",
    "mfu": "end-to-end training throughput and MFU",
    "zero": "ZeRO stages vs DeepSpeed side by side",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m engine.bench SUITE [options]\n\nsuites:")
        for name, what in SUITES.items():
            print(f"  {name:<10} {what}")
        return 0
    suite, rest = args[0], args[1:]
    if suite not in SUITES:
        raise ConfigError(f"unknown benchmark suite '{suite}'", hint="one of " + ", ".join(SUITES))
    module = importlib.import_module(f"engine.benchmarks.{suite}")
    return module.main(rest)


if __name__ == "__main__":
    cli_main(main)
