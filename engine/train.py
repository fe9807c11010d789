"""``python -m engine.train --config C [--set k=v ...] [--resume | --fresh]``

Works under torchrun, the deepspeed launcher (which passes ``--local_rank``), mpirun and srun: the
launch environment is discovered, the process group initialised, and the trainer run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from engine.errors import cli_main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="DeepSpeed-style JSON config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (value parsed as JSON, else string); repeatable",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s for MFU (default: from the device table; none on CPU)",
    )
    p.add_argument(
        "--init-from-hf",
        default=None,
        metavar="DIR",
        help="start from a local transformers GPT-2/Llama checkpoint (sets train.init_from_hf)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    group.add_argument("--fresh", action="store_true", help="delete existing checkpoints and start over")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.config import load_config
    from engine.training.runner import run_training

    overrides = list(args.overrides)
    if args.peak_tflops is not None:
        overrides.append(f"train.peak_tflops={args.peak_tflops}")
    if args.init_from_hf:
        overrides.append(f"train.init_from_hf={json.dumps(args.init_from_hf)}")
    cfg = load_config(args.config, overrides)
    summary = run_training(cfg, resume=True if args.resume else None, fresh=args.fresh, local_rank=args.local_rank)
    if summary.get("rank", 0) == 0:
        final = summary.get("eval") or {}
        line = {"step": summary["step"], "loss": summary["loss"], **final}
        print(
            json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}),
            file=sys.stdout,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    cli_main(main)
