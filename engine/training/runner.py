"""Process setup around the trainer: launch discovery, process groups, the watchdog, device, teardown."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from engine.config import TridentConfig
from engine.distributed.launch import discover
from engine.distributed.topology import Topology
from engine.errors import TridentError
from engine.log import RankLogger
from engine.training.context import RunContext, pick_device
from engine.training.trainer import Trainer

# Substrings of the errors gloo / NCCL / the store raise when a peer vanished mid-collective.
_COMM_ERROR_MARKS = ("gloo", "NCCL", "Connection reset", "Connection closed", "connection", "Broken pipe")


def run_training(
    cfg: TridentConfig, *, resume: bool | str | None = None, fresh: bool = False, local_rank: int | None = None
) -> dict:
    """Train ``cfg`` in this process as one rank of the launched job; returns the trainer's summary + rank."""
    info = discover()
    # A layout that needs more processes than were launched is refused, never silently run on fewer.
    Topology(info.world_size, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline)
    if info.world_size == 1:
        ctx = RunContext.single(pick_device(cfg, info.local_rank if local_rank is None else local_rank))
        trainer = Trainer(cfg, ctx, log=RankLogger(0, 1), resume=resume, fresh=fresh)
        summary = trainer.fit()
        return {**summary, "rank": 0}
    from engine.training.process import distributed_context  # noqa: PLC0415 - multi-process runs only

    with distributed_context(cfg, info) as (ctx, grad_sync):
        with watchdog(cfg, rank=ctx.rank, world_size=ctx.world_size):
            trainer = Trainer(
                cfg, ctx, log=RankLogger(ctx.rank, ctx.world_size), resume=resume, fresh=fresh, grad_sync=grad_sync
            )
            summary = trainer.fit()
            # Leave together: a rank that stops heart-beating while a peer still works is not lost, and the
            # barrier keeps that window to one collective's length.
            ctx.barrier()
        return {**summary, "rank": ctx.rank}


def looks_like_comm_error(err: BaseException) -> bool:
    """True for the errors a collective raises when a peer died (gloo: "Connection reset by peer")."""
    import torch.distributed as dist  # noqa: PLC0415

    return isinstance(err, dist.DistError) or any(mark in str(err) for mark in _COMM_ERROR_MARKS)


@contextlib.contextmanager
def watchdog(cfg: TridentConfig, *, rank: int, world_size: int) -> Iterator[object | None]:
    """Heartbeat + watchdog (``engine.distributed.watchdog``) over the body, for an initialised default group.

    A peer silent for ``resilience.heartbeat_timeout_s`` ends this process with one line naming it. When
    the body raises, the peers are told at once (they exit instead of waiting in a collective); an error
    that looks like a vanished peer first waits for the watchdog to name it (gloo notices a killed peer
    before the heartbeat does, but only says "Connection reset by peer").
    """
    res = cfg.resilience
    if not res.heartbeat_timeout_s:
        yield None
        return
    from engine.distributed.watchdog import Watchdog, default_store, store_host_rank  # noqa: PLC0415

    dog = Watchdog(
        default_store(),
        rank=rank,
        world_size=world_size,
        timeout_s=res.heartbeat_timeout_s,
        interval_s=res.heartbeat_interval_s,
        store_host=store_host_rank(),
    ).start()
    try:
        yield dog
    except TridentError as err:
        dog.fail(str(err))
        raise
    except Exception as err:
        if looks_like_comm_error(err):
            # The default on_lost prints the verdict and exits this process from the checker thread.
            dog.wait_for_verdict(res.heartbeat_timeout_s + 3 * res.heartbeat_interval_s)
        dog.fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise
    except BaseException:
        dog.stop(done=False)
        raise
    dog.stop(done=True)
