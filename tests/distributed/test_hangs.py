"""Hangs and dead ranks (issue 10, item 6): a stopped or killed rank makes every other rank exit within the
heartbeat timeout, with one line naming the missing rank, instead of waiting for a collective timeout.

The watchdog's judgement is tested in-process on a ``HashStore`` with a fake clock (milliseconds); then real
``python -m engine.train`` ranks are launched as subprocesses and one is SIGSTOPped or SIGKILLed mid-run.
The collective timeout is set to 300 s there, so an exit within the test's deadline can only come from
the watchdog. Detection times are printed (``pytest -s``) and never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from engine.config import parse_config
from engine.distributed.watchdog import EXIT_PEER_LOST, Watchdog
from engine.errors import ConfigError
from tests.helpers import BASE

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3.0  # heartbeat timeout of the subprocess runs
INTERVAL_S = 0.5
DEADLINE_S = 60.0  # generous: 2 shared cores; the collective timeout (300 s) is far beyond it


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _dogs(world: int, store=None, *, clock=None, timeout_s: float = 3.0, store_host: int | None = 0):
    store = store if store is not None else dist.HashStore()
    clock = clock or FakeClock()
    return (
        store,
        clock,
        [
            Watchdog(
                store, rank=r, world_size=world, timeout_s=timeout_s, interval_s=0.5, store_host=store_host, clock=clock
            )
            for r in range(world)
        ],
    )


def _tick(clock: FakeClock, dogs, *, seconds: float = 0.5, alive=None) -> list[str | None]:
    """Advance time; every rank in ``alive`` (default all) pulses; return each live rank's verdict."""
    clock.now += seconds
    alive = set(range(len(dogs))) if alive is None else alive
    for r in alive:
        dogs[r].pulse_once()
    return [dog.check_once() if r in alive else None for r, dog in enumerate(dogs)]


def test_healthy_ranks_raise_no_verdict():
    _, clock, dogs = _dogs(4)
    for _ in range(40):  # 20 s of heartbeats, far beyond the 3 s timeout
        assert _tick(clock, dogs) == [None] * 4


def test_silent_rank_is_named_after_the_timeout_and_the_verdict_reaches_every_rank():
    _, clock, dogs = _dogs(4)
    _tick(clock, dogs)
    alive = {0, 1, 3}
    verdicts = [_tick(clock, dogs, alive=alive) for _ in range(6)]  # 3.0 s of silence from rank 2: not yet
    assert all(v is None for step in verdicts for v in step)
    verdict = None
    for _ in range(4):
        verdict = verdict or _tick(clock, dogs, alive=alive)[1]  # rank 1 watches rank 2
    assert verdict is not None and verdict.startswith("rank 2 has not been heard from for 3.")
    dogs[1]._publish(verdict)  # what the checker thread does before exiting
    for r in (0, 3):
        dogs[r].pulse_once()
        assert dogs[r].check_once() == verdict


def test_finished_rank_is_skipped_and_its_successor_watched():
    store, clock, dogs = _dogs(3)
    _tick(clock, dogs)
    store.add("trident/watchdog/done/1", 1)  # rank 1 finished cleanly: silence is no loss
    for _ in range(10):
        assert _tick(clock, dogs, alive={0, 2}) == [None] * 3
    verdict = None
    for _ in range(10):  # now rank 2 falls silent: rank 0 skips finished rank 1 and watches rank 2
        verdict = verdict or _tick(clock, dogs, alive={0})[0]
    assert verdict is not None and verdict.startswith("rank 2 has not been heard from")


class BrokenStore:
    """A store whose host is gone: every call raises like a TCPStore with a dead server."""

    def add(self, key, value):
        raise dist.DistNetworkError("Connection reset by peer")

    set = get = add


def test_unanswering_store_names_its_host_and_a_finished_host_is_no_loss():
    clock = FakeClock()
    dog = Watchdog(BrokenStore(), rank=1, world_size=2, timeout_s=3.0, interval_s=0.5, store_host=0, clock=clock)
    clock.now += 2.9
    assert dog.check_once() is None
    clock.now += 0.2
    verdict = dog.check_once()
    assert verdict.startswith("rank 0 has not been heard from for 3.1 s (it serves the rendezvous store")
    agent = Watchdog(BrokenStore(), rank=1, world_size=2, timeout_s=3.0, interval_s=0.5, store_host=None, clock=clock)
    clock.now += 3.5
    assert agent.check_once().startswith("the rendezvous store (torchrun agent) has not answered")
    store, clock, dogs = _dogs(2)
    _tick(clock, dogs)
    store.add("trident/watchdog/done/0", 1)
    dogs[1].pulse_once()
    dogs[1].store = BrokenStore()  # rank 0 finished, then its store went away with it
    for _ in range(20):
        clock.now += 0.5
        assert dogs[1].check_once() is None


def test_a_paused_checker_does_not_blame_its_peers():
    _, clock, dogs = _dogs(2)
    _tick(clock, dogs)
    clock.now += 30.0  # this whole process was stopped and continued
    assert dogs[0].check_once(paused_for=30.0) is None
    assert _tick(clock, dogs) == [None, None]


def test_config_refuses_a_timeout_shorter_than_two_intervals():
    parse_config({**BASE, "resilience": {"heartbeat_timeout_s": 3, "heartbeat_interval_s": 0.5}})
    parse_config({**BASE, "resilience": {"heartbeat_timeout_s": 0}})  # 0: no watchdog
    with pytest.raises(ConfigError, match=r"^resilience.heartbeat_timeout_s: 1.0 s must be at least twice"):
        parse_config({**BASE, "resilience": {"heartbeat_timeout_s": 1.0, "heartbeat_interval_s": 1.0}})


# ---------------------------------------------------------------------- real ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, world: int, *, tensor: int) -> list[subprocess.Popen]:
    cfg = {
        **BASE,
        "train": {**BASE["train"], "max_steps": 1_000_000, "device": "cpu", "log_dir": str(tmp_path / "run")},
        "parallel": {"tensor": tensor},
        "resilience": {
            "collective_timeout_s": 300,
            "heartbeat_timeout_s": TIMEOUT_S,
            "heartbeat_interval_s": INTERVAL_S,
        },
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        with open(tmp_path / f"rank{rank}.err", "wb") as err:
            # A session of its own, so the finally below can kill exactly this rank's process group.
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "engine.train", "--config", str(tmp_path / "cfg.json")],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            )
    return procs


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)


def _wait_for_training(tmp_path: Path, procs, *, steps: int) -> None:
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        dead = [r for r, p in enumerate(procs) if p.poll() is not None]
        assert not dead, f"rank {dead[0]} exited early: {(tmp_path / f'rank{dead[0]}.err').read_text()[-2000:]}"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    pytest.fail("training did not start within 180 s")


def _lose_rank(tmp_path: Path, *, world: int, tensor: int, victim: int, sig: int) -> dict[int, float]:
    """Launch ``world`` ranks, send ``sig`` to ``victim`` mid-run, return each survivor's exit delay (s)."""
    procs = _launch(tmp_path, world, tensor=tensor)
    try:
        _wait_for_training(tmp_path, procs, steps=3)
        os.kill(procs[victim].pid, sig)
        start = time.monotonic()
        survivors = [r for r in range(world) if r != victim]
        delays: dict[int, float] = {}
        while len(delays) < len(survivors) and time.monotonic() < start + DEADLINE_S:
            for r in survivors:
                if r not in delays and procs[r].poll() is not None:
                    delays[r] = time.monotonic() - start
            time.sleep(0.05)
        hanging = [r for r in survivors if r not in delays]
        assert not hanging, f"ranks {hanging} still running {DEADLINE_S} s after rank {victim} was lost"
        for r in survivors:
            err = (tmp_path / f"rank{r}.err").read_text()
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert procs[r].returncode == EXIT_PEER_LOST, f"rank {r}: exit {procs[r].returncode}\n{err[-3000:]}"
            assert len(errors) == 1 and errors[0].startswith(f"error: rank {victim} has not been heard from for "), (
                f"rank {r}:\n{err[-3000:]}"
            )
            assert "Traceback" not in err, f"rank {r}:\n{err[-3000:]}"
        print(
            f"\n{signal.Signals(sig).name} rank {victim}/{world}: survivors exited after "
            + ", ".join(f"rank {r} {d:.2f} s" for r, d in sorted(delays.items()))
            + f" (heartbeat timeout {TIMEOUT_S} s, interval {INTERVAL_S} s)"
        )
        return delays
    finally:
        _kill_all(procs)


def test_sigstopped_rank_ends_every_other_rank_4_ranks_tp2_dp2(tmp_path):
    _lose_rank(tmp_path, world=4, tensor=2, victim=2, sig=signal.SIGSTOP)


def test_sigkilled_rank_ends_the_other_rank(tmp_path):
    # gloo notices first ("Connection reset by peer"); the runner waits for the watchdog to name the rank.
    _lose_rank(tmp_path, world=2, tensor=1, victim=1, sig=signal.SIGKILL)


def test_sigstopped_store_host_ends_the_other_rank(tmp_path):
    # Rank 0 serves the tcp:// rendezvous store: the survivors' store calls hang, and that silence names it.
    _lose_rank(tmp_path, world=2, tensor=1, victim=0, sig=signal.SIGSTOP)
