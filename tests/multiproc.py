"""THE helper for multi-process tests: run one function on N gloo ranks and collect what each returns.

    from tests.multiproc import run_ranks

    def _checks(rank, world_size, args):          # module level, so spawned processes can import it
        ...                                        # torch.distributed is initialised (gloo)
        return {"sum": total.tolist(), ...}        # anything picklable; tensors are copied back

    def test_something():
        results = run_ranks(_checks, 2, args={"n": 3})   # results[r] = rank r's return value

Spawning costs seconds (each rank imports torch: ~2.5 s for 2 ranks, ~9 s for 8), so put several
checks in one function and return a dict of results rather than spawning per assertion.

Rendezvous is a ``file://`` in a fresh temporary directory (no port races between concurrent tests). A
rank that raises makes ``run_ranks`` raise ``RankFailed`` carrying that rank's traceback, and kills the
others (which would otherwise wait forever in a collective). A run longer than ``timeout_s`` kills every
rank and raises ``RankFailed`` too, so a test never hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


class RankFailed(AssertionError):
    """A rank raised, died or timed out; the message holds its traceback."""


def _worker(fn: Callable, rank: int, world_size: int, args: Any, init_file: str, results: mp.Queue) -> None:
    try:
        import torch  # noqa: PLC0415 - imported in the child only
        import torch.distributed as dist  # noqa: PLC0415

        torch.set_num_threads(1)  # N ranks share the CI machine's 2 cores
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            value = fn(rank, world_size, args)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensors by value (torch's multiprocessing pickler would share memory
        # that dies with this process).
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[[int, int, Any], Any], world_size: int, *, args: Any = None, timeout_s: float = 120) -> list:
    """Run ``fn(rank, world_size, args)`` on ``world_size`` gloo ranks; return the values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="trident-rdzv-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, args, init_file, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        values: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(values) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RankFailed(
                        f"timed out after {timeout_s} s; "
                        f"ranks {sorted(set(range(world_size)) - set(values))} "
                        "did not finish"
                    )
                try:
                    rank, status, payload = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                    if dead:
                        raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                    continue
                if status == "error":
                    raise RankFailed(f"rank {rank} of {world_size} raised:\n{payload}")
                values[rank] = pickle.loads(payload)
        finally:
            for p in procs:  # only the processes started here, by object
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
            results.close()
    return [values[r] for r in range(world_size)]
