"""Heartbeats and a watchdog: a stopped, killed or stuck rank makes every other rank exit within seconds.

Why: a collective timeout (``resilience.collective_timeout_s``) only fires inside a collective, defaults to
10 minutes, and gloo may wait on a dead peer's socket or never reach the collective at all (a rank blocked
before it, SIGSTOP, a hung data read). So each rank runs two daemon threads beside the training loop:

* **pulse** (does the store I/O, may block): every ``interval_s`` it increments this rank's counter in the
  rendezvous store (``torch.distributed``'s default ``TCPStore``, under a prefix), reads the counter of the
  rank it watches, and reads the shared verdict key.
* **checker** (never touches the store, never blocks): every ``interval_s / 2`` it compares local
  monotonic times. When the watched rank's counter has not moved for ``timeout_s`` it publishes a verdict
  naming that rank; when the store itself has not answered for ``timeout_s``, the store's host is the
  missing one (rank 0 under ``tcp://`` rendezvous, the torchrun agent otherwise). Either way it prints
  one line, ``error: rank N has not been heard from for X s (hint: ...)``, and ``os._exit``\\ s with
  :data:`EXIT_PEER_LOST`: the main thread may be stuck in a collective that no exception can interrupt.

Scaling: rank ``r`` watches only ``(r + 1) % world`` (skipping ranks that finished cleanly), so the store
sees O(1) requests per rank per interval instead of O(world). Some live rank always watches a dead one
(walk back from any dead rank to the first live one), and the verdict key tells every other rank, so all
of them exit within about ``timeout_s + 2 * interval_s``.

Wall clocks are never compared across hosts: a heartbeat is a counter, and its age is measured by the
observer's own ``time.monotonic``. A checker that was itself paused (SIGSTOP then SIGCONT, a laptop
sleeping) notices the gap in its own ticks and restarts its measurements instead of blaming a peer.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

EXIT_PEER_LOST = 5
KEY_PREFIX = "trident/watchdog/"
HINT = (
    "the process was stopped, killed (out of memory?) or its host is unreachable: check that rank's log "
    "and the system log; raise resilience.heartbeat_timeout_s if ranks pause longer on purpose"
)


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def store_host_rank() -> int | None:
    """Rank whose process serves the default store: 0 for ``tcp://`` rendezvous, None for torchrun's agent."""
    return None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" else 0


class Watchdog:
    """Heartbeat this rank and watch one peer through ``store`` (a ``torch.distributed.Store``).

    ``on_lost(message)`` defaults to printing ``error: <message>`` and ``os._exit(EXIT_PEER_LOST)``; tests
    pass a recorder. ``store_host`` names the rank serving the store (None: a separate process).
    """

    def __init__(
        self,
        store,
        *,
        rank: int,
        world_size: int,
        timeout_s: float,
        interval_s: float = 1.0,
        store_host: int | None = 0,
        on_lost: Callable[[str], None] = _die,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < 2 * interval_s <= timeout_s:
            raise ValueError(f"need 0 < 2 x interval ({interval_s}) <= timeout ({timeout_s})")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.interval_s, self.store_host = timeout_s, interval_s, store_host
        self.on_lost, self.clock = on_lost, clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        now = clock()
        self._last_store_ok = now  # last completed round trip to the store
        self._watched: int | None = None  # the peer whose counter we follow
        self._watched_count = -1
        self._watched_since = now  # local time its counter last moved (or we started watching it)
        self._verdict: str | None = None  # published by any rank
        self._host_done = False  # the store's host finished cleanly: its going away is no loss
        self._fired = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Watchdog:
        for name, target in (("pulse", self._pulse_loop), ("checker", self._check_loop)):
            t = threading.Thread(target=target, name=f"trident-watchdog-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, *, done: bool = True) -> None:
        """Stop both threads; ``done`` tells the peers this rank finished cleanly (not lost)."""
        self._stop.set()
        if done:
            self._call_briefly(lambda: self.store.add(self._key("done", self.rank), 1))
        for t in self._threads:
            t.join(timeout=self.interval_s)

    def fail(self, message: str) -> None:
        """Stop watching and tell every rank that this one is failing (they exit now, not after the timeout)."""
        self._stop.set()
        self._publish(f"rank {self.rank} failed: {message}")
        for t in self._threads:
            t.join(timeout=self.interval_s)

    def wait_for_verdict(self, seconds: float) -> str | None:
        """Block up to ``seconds`` for a lost-peer verdict; the default ``on_lost`` exits before returning."""
        deadline = self.clock() + seconds
        while self.clock() < deadline:
            with self._lock:
                if self._fired:
                    return self._verdict
            time.sleep(min(0.05, self.interval_s / 4))
        return None

    # ------------------------------------------------------------------ store I/O (pulse thread)

    def _key(self, kind: str, rank: int | None = None) -> str:
        return KEY_PREFIX + kind + ("" if rank is None else f"/{rank}")

    def _call_briefly(self, fn: Callable[[], object]) -> None:
        """Run a store call from a helper thread, giving up after one interval (the store may be stuck)."""
        t = threading.Thread(target=lambda: _ignore_errors(fn), daemon=True)
        t.start()
        t.join(timeout=self.interval_s)

    def _publish(self, message: str) -> None:
        def send() -> None:
            self.store.set(self._key("verdict"), message)
            self.store.add(self._key("verdicts"), 1)

        self._call_briefly(send)

    def _next_watched(self) -> int | None:
        """The first successor (cyclically) that has not finished cleanly; None when all have."""
        for step in range(1, self.world_size):
            peer = (self.rank + step) % self.world_size
            if self.store.add(self._key("done", peer), 0) == 0:
                return peer
        return None

    def pulse_once(self) -> None:
        """One heartbeat and one look at the watched peer and the verdict key (raises on store errors)."""
        self.store.add(self._key("beat", self.rank), 1)
        verdict = None
        if self.store.add(self._key("verdicts"), 0) > 0:
            verdict = self.store.get(self._key("verdict")).decode(errors="replace")
        watched = self._watched
        if watched is None or self.store.add(self._key("done", watched), 0) > 0:
            watched = self._next_watched()
        count = self.store.add(self._key("beat", watched), 0) if watched is not None else -1
        host_done = self.store_host is not None and self.store.add(self._key("done", self.store_host), 0) > 0
        now = self.clock()
        with self._lock:
            self._last_store_ok = now
            self._host_done = self._host_done or host_done
            if verdict is not None and self._verdict is None:
                self._verdict = verdict
            if watched != self._watched or count != self._watched_count:
                self._watched, self._watched_count, self._watched_since = watched, count, now

    def _pulse_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.pulse_once()
            except Exception:  # noqa: BLE001 - an unreachable store is judged by its age in check_once
                pass
            self._stop.wait(self.interval_s)

    # ------------------------------------------------------------------ judgement (checker thread)

    def check_once(self, *, paused_for: float = 0.0) -> str | None:
        """The verdict at this moment, or None. ``paused_for``: how long this checker itself was not run."""
        now = self.clock()
        with self._lock:
            if paused_for > self.timeout_s / 2:
                # We were not scheduled (SIGSTOP + SIGCONT, suspended VM): our ages mean nothing.
                self._last_store_ok = self._watched_since = now
                return None
            if self._verdict is not None:
                return self._verdict
            store_age = now - self._last_store_ok
            if store_age > self.timeout_s:
                if self._host_done:
                    return None  # the store left with its host at the end of the run: nothing to judge
                if self.store_host is None:
                    return (
                        f"the rendezvous store (torchrun agent) has not answered for {store_age:.1f} s "
                        f"(hint: the launcher was stopped or killed, or its host is unreachable)"
                    )
                return (
                    f"rank {self.store_host} has not been heard from for {store_age:.1f} s "
                    f"(it serves the rendezvous store; hint: {HINT})"
                )
            # Silence counts only while the store answered (else the store, judged above, is to blame).
            age = self._last_store_ok - self._watched_since
            if self._watched is not None and age > self.timeout_s:
                return f"rank {self._watched} has not been heard from for {age:.1f} s (hint: {HINT})"
        return None

    def _check_loop(self) -> None:
        tick = self.interval_s / 2
        last = self.clock()
        while not self._stop.wait(tick):
            now = self.clock()
            verdict = self.check_once(paused_for=now - last - tick)
            last = now
            if verdict is None:
                continue
            with self._lock:
                own = self._verdict is None
                self._verdict, self._fired = verdict, True
            if own:
                self._publish(verdict)  # so every rank exits now, not after its own timeout
            if not self._stop.is_set():
                self.on_lost(verdict)
            return


def _ignore_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - best effort: the store may already be gone
        pass


def default_store():
    """The default process group's store, wrapped under nothing (keys carry :data:`KEY_PREFIX`)."""
    from torch.distributed import distributed_c10d  # noqa: PLC0415 - torch only when distributed

    # Private but stable since torch 1.x; the alternative (a second TCPStore) would need a second port.
    return distributed_c10d._get_default_store()
