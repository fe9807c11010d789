"""Checkpoint shards written on a background thread (``train.async_save``; Megatron-LM's ``--async-save``).

The training thread only takes a host snapshot of the state (engine/checkpoint/snapshot.py) and returns to
training; one writer thread per rank then runs :func:`store.write_shard` (shard, fsync, SHA-256 sidecar)
into the ``.tmp_step_XXXXXXXX`` directory that :func:`store.prepare_save` made. The commit (barrier, rank 0
publishes, barrier) needs collectives, so it never runs on the writer thread: the owner calls
:meth:`AsyncCheckpointWriter.wait` on the training thread and commits (engine/trainer.py ``finalize_save``).
Until then the checkpoint does not exist for any reader: ``latest`` and every complete step directory are
the ones before it, exactly as after a crash in the middle of a synchronous save.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from engine.checkpoint import store
from engine.checkpoint.snapshot import HostSnapshot


@dataclass
class WriteResult:
    """One background write, as the training thread sees it once the writer finished."""

    step: int
    tmp: str
    snapshot_s: float  # the training thread was blocked this long taking the snapshot
    write_s: float  # the writer thread's time for shard + fsync + hash
    waited_s: float  # how long wait() blocked the training thread for the writer to finish
    error: BaseException | None  # what the writer raised (CheckpointError for an OS error), else None


class _Pending:
    def __init__(self, step: int, tmp: str, snapshot_s: float) -> None:
        self.step, self.tmp, self.snapshot_s = step, tmp, snapshot_s
        self.thread: threading.Thread | None = None
        self.write_s = 0.0
        self.error: BaseException | None = None


class AsyncCheckpointWriter:
    """At most one background shard write per rank; owned and driven by the training thread."""

    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self.snapshots = HostSnapshot()  # keeps its host buffers for the next save
        self._pending: _Pending | None = None

    @property
    def pending_step(self) -> int | None:
        """The step being written and not yet collected by :meth:`wait`, else None."""
        return None if self._pending is None else self._pending.step

    def snapshot(self, state: dict) -> dict:
        if self._pending is not None:  # its buffers may still be in use
            raise RuntimeError("a checkpoint write is still in flight: wait() for it before the next snapshot")
        return self.snapshots.take(state)

    def start(self, tmp: str, snapshot: dict, *, step: int, snapshot_s: float) -> None:
        """Write ``snapshot`` (from :meth:`snapshot`) as this rank's shard in ``tmp`` on a new thread."""
        if self._pending is not None:
            raise RuntimeError("a checkpoint write is still in flight: wait() for it before starting another")
        # A daemon: a process that dies or exits before the commit must not hang on it (the tmp directory is
        # then simply never committed). The thread drops its args when the write returns.
        pending = _Pending(step, tmp, snapshot_s)
        pending.thread = threading.Thread(
            target=self._write, args=(pending, snapshot), daemon=True, name=f"trident-ckpt-writer-rank{self.rank}"
        )
        self._pending = pending
        pending.thread.start()

    def _write(self, pending: _Pending, snapshot: dict) -> None:
        t0 = time.perf_counter()
        try:
            store.write_shard(pending.tmp, snapshot, rank=self.rank)
        except BaseException as err:  # noqa: BLE001 - re-raised on the training thread by wait()
            pending.error = err
        finally:
            pending.write_s = time.perf_counter() - t0

    def wait(self) -> WriteResult | None:
        """Join the writer (training thread) and hand over its result; None when nothing was in flight."""
        pending, t0 = self._pending, time.perf_counter()
        if pending is None:
            return None
        pending.thread.join()
        self._pending = None
        return WriteResult(
            step=pending.step,
            tmp=pending.tmp,
            snapshot_s=pending.snapshot_s,
            write_s=pending.write_s,
            waited_s=time.perf_counter() - t0,
            error=pending.error,
        )
