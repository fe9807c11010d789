"""Rank-aware logging: info prints once (rank 0); warnings and errors print on every rank, tagged."""

from __future__ import annotations

import sys
import time


class RankLogger:
    """Logger bound to one rank. Pass it around; there is no global instance."""

    def __init__(self, rank: int = 0, world_size: int = 1, *, stream=None) -> None:
        self.rank = rank
        self.world_size = world_size
        self._stream = stream

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def _emit(self, level: str, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        tag = f" [rank {self.rank}]" if self.world_size > 1 and level != "info" else ""
        print(f"[{stamp}] {level}{tag}: {msg}", file=self.stream, flush=True)

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self._emit("info", msg)

    def warning(self, msg: str) -> None:
        self._emit("warning", msg)

    def error(self, msg: str) -> None:
        self._emit("error", msg)
