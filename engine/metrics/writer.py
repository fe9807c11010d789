"""Metrics sinks: ``<log_dir>/metrics.jsonl`` (one JSON object per logged step, floats at full precision),
TensorBoard scalars when tensorboard is installed and enabled, and Weights & Biases when the ``wandb``
section is enabled (DeepSpeed's monitor keys: project, group, team). Rank 0 writes; others hold a no-op."""

from __future__ import annotations

import json
import math
import os


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class MetricsWriter:
    def __init__(
        self,
        log_dir: str,
        *,
        enabled: bool,
        tensorboard_dir: str | None = None,
        append: bool = False,
        wandb=None,
        run_config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._fh = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None and wandb.enabled:
            self._wandb = start_wandb(wandb, log_dir=log_dir, run_config=run_config)
        os.makedirs(log_dir, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(_jsonable(record)) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{sub}", v, step)
        if self._wandb is not None:
            self._wandb.log(scalars(record), step=record["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def scalars(record: dict) -> dict[str, float]:
    """Numeric entries of a metrics record, nested dicts flattened as ``key/sub`` (e.g. comm_bytes/tp)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[key] = value
    return out


def start_wandb(cfg, *, log_dir: str, run_config: dict | None):
    """A W&B run for DeepSpeed's ``wandb`` section (project, group, team = entity); resumes by run id on
    restart so a requeued job continues the same curves."""
    import wandb

    os.makedirs(log_dir, exist_ok=True)
    id_file = os.path.join(log_dir, "wandb_run_id")
    run_id = open(id_file, encoding="utf-8").read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
    with open(id_file, "w", encoding="utf-8") as fh:
        fh.write(run_id + "\n")
    return wandb.init(
        project=cfg.project, group=cfg.group, entity=cfg.team, dir=log_dir, id=run_id, resume="allow", config=run_config
    )


def peak_memory_bytes(device) -> int:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
