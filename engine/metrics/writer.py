"""Metrics sinks: ``<log_dir>/metrics.jsonl`` (one JSON object per logged step, floats at full precision)
and TensorBoard scalars when tensorboard is installed and enabled. Rank 0 writes; others hold a no-op."""

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
    def __init__(self, log_dir: str, *, enabled: bool, tensorboard_dir: str | None = None,
                 append: bool = False) -> None:
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self._fh = None
        self._tb = None
        if not enabled:
            return
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

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def peak_memory_bytes(device) -> int:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
