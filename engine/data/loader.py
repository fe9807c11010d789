"""Step loader: this data-parallel rank's micro-batches of each optimizer step, resumable exactly.

With global batch G, micro-batch m, DP size d and accumulation A = G / (m * d), the global batch of
the step that starts after ``consumed_samples = c`` is sample ids ``[c, c + G)`` (``[s*G, (s+1)*G)`` for
step s), whatever d is. Those ids are cut into A global micro-batches of ``m * d`` consecutive ids, and
rank r takes ids ``c + k*m*d + r*m + [0, m)`` as its k-th micro-batch (Megatron-LM's sampler layout).
State is only ``consumed_samples``, so a resume with another d but the same G reads the same steps.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from engine.data.dataset import SampleDataset
from engine.errors import ConfigError, DataError


def rank_sample_ids(
    consumed_samples: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> np.ndarray:
    """(A, micro_batch_size) sample ids of ``dp_rank`` for the step starting at ``consumed_samples``."""
    per_micro = micro_batch_size * dp_size
    accum = global_batch_size // per_micro
    k = np.arange(accum, dtype=np.int64)[:, None]
    j = np.arange(micro_batch_size, dtype=np.int64)[None, :]
    return consumed_samples + k * per_micro + dp_rank * micro_batch_size + j


class StepLoader:
    """``next_step()`` -> list of A int64 tensors ``(micro_batch_size, seq_len + 1)`` for this rank.

    A background thread reads up to ``prefetch`` steps ahead (0 disables it); ``state_dict`` counts
    only the steps handed out, so a checkpoint taken between steps resumes exactly.
    """

    def __init__(
        self,
        dataset: SampleDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        prefetch: int = 2,
    ) -> None:
        if min(global_batch_size, micro_batch_size, dp_size) < 1:
            raise ConfigError("train_batch_size, train_micro_batch_size_per_gpu and the DP size must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"train_batch_size {global_batch_size} is not a multiple of micro batch {micro_batch_size} "
                f"x DP {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank {dp_rank} outside DP size {dp_size}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum = global_batch_size // (micro_batch_size * dp_size)
        self.prefetch = prefetch
        self.consumed_samples = int(consumed_samples)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def step_ids(self, consumed_samples: int) -> np.ndarray:
        return rank_sample_ids(
            consumed_samples,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def read_step(self, consumed_samples: int) -> list[torch.Tensor]:
        """The micro-batches of the step starting at ``consumed_samples`` (no state change)."""
        ids = self.step_ids(consumed_samples)
        end = consumed_samples + self.global_batch_size
        if end > len(self.dataset):
            raise DataError(
                f"dataset has {len(self.dataset)} samples; step needs ids up to {end - 1}",
                hint="build the datasets with num_train_samples >= train_batch_size * train.max_steps",
            )
        batch = self.dataset.get_batch(ids.reshape(-1))  # (A * m, seq_len + 1)
        return [torch.from_numpy(b) for b in batch.reshape(self.grad_accum, self.micro_batch_size, -1)]

    def next_step(self) -> list[torch.Tensor]:
        if self.prefetch <= 0:
            step = self.read_step(self.consumed_samples)
        else:
            if self._thread is None:
                self._start()
            step = self._queue.get()
            if isinstance(step, BaseException):
                self._thread = None
                raise step
        self.consumed_samples += self.global_batch_size
        return step

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        start = self.consumed_samples

        def produce() -> None:
            position = start
            while not self._stop.is_set():
                try:
                    item = self.read_step(position)
                except BaseException as err:  # handed to the consumer, raised there
                    item = err
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return
                position += self.global_batch_size

        self._thread = threading.Thread(target=produce, name="trident-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread (reads already queued are dropped)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.consumed_samples = int(state["consumed_samples"])

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self.close()
