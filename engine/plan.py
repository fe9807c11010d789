"""``python -m engine.plan --config C [--world-size N] [--tokens T] [--mfu M] [--peak-tflops P]``

Back-of-the-envelope sizing of a run: parameters, FLOPs, the Chinchilla-optimal token count,
model-state memory per device for each ZeRO stage, activation memory and time at a given MFU
(``engine/planning/``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine.config import load_config
from engine.errors import ConfigError, cli_main
from engine.planning import plan


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world-size", type=int, default=None, help="devices (default: tensor x pipeline)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens (default: from max_steps)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (0-1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: H100 dense)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu: {args.mfu} must be in (0, 1]")
    world = args.world_size or cfg.parallel.tensor * cfg.parallel.pipeline
    print("\n".join(plan(cfg, world_size=world, tokens=args.tokens, mfu=args.mfu, peak_tflops=args.peak_tflops)))
    return 0


if __name__ == "__main__":
    cli_main(main)
