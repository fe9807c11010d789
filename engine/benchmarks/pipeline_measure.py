"""Measure the bubble of the real executor: p gloo ranks on this machine run a small model's pipeline steps.

Each rank records when each of its compute ops (forward, backward) started and ended
(``PipelineExecutor.trace``, ``time.perf_counter``: CLOCK_MONOTONIC on Linux, one clock for all
processes). Per step, with ``busy`` the compute time of each stage and ``makespan`` the time from the
first op's start on any stage to the last op's end on any stage, the idle fraction is the simulator's
(Narayanan et al. 2021): ``(p * makespan - sum(busy)) / sum(busy)``. Time spent waiting in exchanges
counts as idle, as it does in a real pipeline.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass

Trace = list[tuple[str, int, int, float, float]]  # (kind F/B/X, micro, chunk, start, end)


@dataclass(frozen=True)
class MeasureOptions:
    schedule: str
    stages: int
    microbatches: int
    virtual: int = 1
    layers_per_chunk: int = 2
    d_model: int = 128
    seq_len: int = 64
    micro_batch: int = 4
    warmup: int = 2
    steps: int = 5
    overlap_p2p: bool = True


def _config(opts: MeasureOptions):
    from engine.config import parse_config  # noqa: PLC0415 - imported in the spawned ranks

    return parse_config(
        {
            "train_micro_batch_size_per_gpu": opts.micro_batch,
            "gradient_accumulation_steps": opts.microbatches,
            "model": {
                "arch": "gpt2",
                "n_layers": opts.layers_per_chunk * opts.stages * opts.virtual,
                "d_model": opts.d_model,
                "n_heads": max(1, opts.d_model // 32),
                "seq_len": opts.seq_len,
                "vocab_size": 512,
            },
            "parallel": {"pipeline": opts.stages, "pipeline_schedule": opts.schedule, "virtual_stages": opts.virtual},
            "data": {"synthetic": True},
            "train": {"device": "cpu"},
        },
        source="pipeline --measure",
    )


def _steps(rank: int, world: int, opts: MeasureOptions) -> list[Trace]:
    import torch  # noqa: PLC0415

    from engine.distributed import collectives  # noqa: PLC0415
    from engine.pipeline.executor import PipelineExecutor  # noqa: PLC0415
    from engine.pipeline.stage_model import build_stage_model  # noqa: PLC0415
    from engine.training.process import build_context  # noqa: PLC0415

    cfg = _config(opts)
    ctx, _ = build_context(cfg, rank=rank, world_size=world)
    model = build_stage_model(cfg, ctx)
    runner = PipelineExecutor(cfg, ctx, model, overlap_p2p=opts.overlap_p2p, schedule=opts.schedule)
    gen = torch.Generator().manual_seed(0)
    tokens = [
        torch.randint(0, cfg.model.vocab_size, (opts.micro_batch, opts.seq_len + 1), generator=gen)
        for _ in range(opts.microbatches)
    ]
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    traces = []
    for step in range(opts.warmup + opts.steps):
        collectives.barrier(ctx.groups.world)
        runner.trace = []
        runner.forward_backward(batches, loss_scale=1.0, n_tokens=float(opts.micro_batch * opts.seq_len))
        model.zero_grad(set_to_none=True)
        if step >= opts.warmup:
            traces.append(runner.trace)
    return traces


def _worker(rank: int, world: int, opts: MeasureOptions, init_file: str, results) -> None:
    try:
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        torch.set_num_threads(1)  # one core's worth per stage, like one device each
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
        try:
            results.put((rank, "ok", _steps(rank, world, opts)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()))


def run_measurement(opts: MeasureOptions, *, timeout_s: float = 600) -> list[list[Trace]]:
    """traces[stage][step]: each stage's compute/exchange spans of each measured step."""
    _config(opts)  # refuse a bad layout here, not in p processes
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="trident-pp-measure-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, opts.stages, opts, init_file, results), daemon=True)
            for r in range(opts.stages)
        ]
        for proc in procs:
            proc.start()
        traces: dict[int, list[Trace]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(traces) < opts.stages:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pipeline measurement timed out after {timeout_s} s")
                try:
                    rank, status, payload = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in traces]
                    if dead:
                        raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                    continue
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                traces[rank] = payload
        finally:
            for proc in procs:  # only the processes started here
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)
    return [traces[r] for r in range(opts.stages)]


@dataclass(frozen=True)
class StepMeasure:
    makespan: float
    busy: list[float]  # per stage
    fwd_time: float  # mean forward time of one chunk
    bwd_time: float  # mean backward (zero-bubble: input-gradient pass) time of one chunk
    wgrad_time: float = 0.0  # zero-bubble: mean weight-gradient pass time

    @property
    def bubble(self) -> float:
        total = sum(self.busy)
        return (len(self.busy) * self.makespan - total) / total


def step_measure(stage_traces: list[Trace]) -> StepMeasure:
    """Idle fraction of one step from every stage's trace of it."""
    compute = [[span for span in trace if span[0] in "FBW"] for trace in stage_traces]
    start = min(spans[0][3] for spans in compute)
    end = max(spans[-1][4] for spans in compute)
    fwd = [e - s for spans in compute for k, _, _, s, e in spans if k == "F"]
    bwd = [e - s for spans in compute for k, _, _, s, e in spans if k == "B"]
    wgrad = [e - s for spans in compute for k, _, _, s, e in spans if k == "W"]
    return StepMeasure(
        makespan=end - start,
        busy=[sum(e - s for *_, s, e in spans) for spans in compute],
        fwd_time=sum(fwd) / len(fwd),
        bwd_time=sum(bwd) / len(bwd),
        wgrad_time=sum(wgrad) / len(wgrad) if wgrad else 0.0,
    )
