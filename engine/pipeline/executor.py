"""Run one stage's instruction stream (``schedules.py``) on its model chunk(s), with batched p2p.

The trainer sees the same two methods as ``engine.model.step.SingleStageRunner``; only this object knows
that the model is cut into stages. Per step:

- every stage gets the step's A micro-batches (inputs and targets, (m, S) each): model chunk 0 embeds the
  inputs, the last model chunk computes the loss against the targets, the others ignore them;
- ``Forward(micro, chunk)`` runs one chunk and keeps (input, output) until the matching ``Backward``, which
  back-propagates the received output gradient (or, on the last model chunk, the loss scaled by
  ``loss_scale / n_tokens``), hands the input's gradient to the next exchange and drops both: a micro-batch's
  activations live exactly from its forward to its backward;
- ``Exchange(ops)`` is one ``batch_isend_irecv`` on the pp group (the pairing that makes this deadlock-free
  is the schedule's, see ``exchanges.py``). With ``overlap_p2p`` (the default, Megatron-LM's
  ``overlap_p2p_comm``) the exchange is posted and the stage goes on; it waits for the exchange only when a
  compute op needs a tensor it receives, and for all of them at the end of the step. Without it, each
  exchange is waited on as soon as it is posted. Waiting later never deadlocks where waiting at once does
  not (posts happen at the same points of the stream, only waits move), and it matters: the exchanges are
  paired on a unit-time plan, so with backward slower than forward a blocking interleaved schedule stalls
  at rendezvous points (simulated bubble 3/8 instead of 3/16 for p=4, m=8, v=2, backward = 2 x forward)
  while the overlapped one reaches the formula (``simulate(..., wait="need")``). Received tensors are
  queued per (micro-batch, chunk) because a receive may come before the op that needs it.

Shapes are agreed once, without a handshake: every stage gets the same micro-batches, so each derives the
message shape (S/tp with sequence parallelism, B, H) from them and the config; the dtype is the compute
dtype (the parameters'). Gradients accumulate into the optimizer's flat fp32 buffers through its
post-accumulate-grad hooks; the ``ReduceGrads``/``OptimizerStep`` instructions are the trainer's (the
optimizer reduces over dp and the embedding group in ``step``), so they are no-ops here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.distributed import collectives
from engine.pipeline.schedules import (
    Backward,
    BackwardWeight,
    Exchange,
    Forward,
    Instruction,
    RecvActivation,
    SendActivation,
    SendGrad,
    build_all,
    build_forward_only,
)
from engine.pipeline.stage_model import check_pipeline_layout

Key = tuple[int, int]  # (micro-batch, local chunk)


@dataclass
class _Batch:
    """One posted exchange: its handle, the tensors it must keep alive, and where received tensors go."""

    handle: collectives.Handle
    tensors: list[torch.Tensor]
    arrivals: list[tuple[dict[Key, torch.Tensor], Key, torch.Tensor]]

    def complete(self) -> None:
        """Wait for every op of the exchange and queue what it received (idempotent)."""
        self.handle.wait()
        for queue, key, buf in self.arrivals:
            queue[key] = buf
        self.arrivals, self.tensors = [], []


@dataclass
class _StepState:
    """What one step keeps between instructions; everything here is dropped at the end of the step."""

    total: torch.Tensor
    pending: dict[Key, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)  # (input, output)
    weight_pending: dict[Key, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # zb: (out, grad)
    recv_act: dict[Key, torch.Tensor] = field(default_factory=dict)
    recv_grad: dict[Key, torch.Tensor] = field(default_factory=dict)
    send_act: dict[Key, torch.Tensor] = field(default_factory=dict)
    send_grad: dict[Key, torch.Tensor] = field(default_factory=dict)
    posted: list[_Batch] = field(default_factory=list)  # overlap_p2p: exchanges not waited on yet
    act_batch: dict[Key, _Batch] = field(default_factory=dict)  # where a pending activation arrives
    grad_batch: dict[Key, _Batch] = field(default_factory=dict)

    def take(self, queue: dict[Key, torch.Tensor], batches: dict[Key, _Batch], key: Key) -> torch.Tensor:
        """A received tensor, waiting for its exchange first if it is still in flight."""
        batch = batches.pop(key, None)
        if batch is not None:
            batch.complete()  # no-op when another tensor of the same exchange already waited for it
        return queue.pop(key)


class PipelineExecutor:
    """Forward/backward of one pipeline stage over a step's micro-batches.

    ``trace``: set it to a list to record ``(kind, micro, chunk, start, end)`` for every compute op and
    exchange (``time.perf_counter`` seconds), as the ``--measure`` benchmark does; None (default) records
    nothing.
    """

    def __init__(self, cfg, ctx, model: nn.Module, *, overlap_p2p: bool = True, schedule: str | None = None) -> None:
        self.chunks: list[nn.Module] = list(model) if isinstance(model, nn.ModuleList) else [model]
        self.group = ctx.groups.pp
        self.stage, self.stages = ctx.pp_rank, cfg.parallel.pipeline
        self.virtual = cfg.parallel.virtual_stages
        self.schedule = schedule or cfg.parallel.pipeline_schedule
        # Zero-bubble schedules split each backward into input-gradient (B) and weight-gradient (W) passes.
        self.split_backward = self.schedule == "zb-h1"
        self.microbatches = check_pipeline_layout(cfg, dp=ctx.dp_size)
        if len(self.chunks) != self.virtual:
            raise ValueError(f"stage model has {len(self.chunks)} chunks, parallel.virtual_stages={self.virtual}")
        self.d_model = cfg.model.d_model
        self.tp = ctx.groups.tp.size
        self.overlap_p2p = overlap_p2p
        self.trace: list[tuple[str, int, int, float, float]] | None = None
        self._streams: dict[tuple[bool, int], list[Instruction]] = {}
        # NCCL: the first operation on a group used by batch_isend_irecv must involve all of its ranks, and
        # the first exchange of a schedule involves only stages 0 and 1. One collective here creates it.
        collectives.barrier(self.group)

    # ------------------------------------------------------------------ public (SingleStageRunner's API)

    def forward_backward(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]], *, loss_scale: float, n_tokens: float
    ) -> torch.Tensor:
        """Back-propagate sum(token losses) * loss_scale / n_tokens per micro-batch; return the fp32 sum of
        token losses over the micro-batches, the same on every stage (broadcast from the last)."""
        total = torch.zeros((), dtype=torch.float32, device=batches[0][0].device)
        scale = loss_scale / max(n_tokens, 1.0)
        self._run(self._stream(len(batches), train=True), batches, _StepState(total), scale=scale)
        return collectives.broadcast(total, self.group, src=self.stages - 1)

    @torch.no_grad()
    def forward_only(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
        self._run(self._stream(len(batches), train=False), batches, _StepState(total), scale=None)
        return collectives.broadcast(total, self.group, src=self.stages - 1)

    # ------------------------------------------------------------------ streams

    def _stream(self, microbatches: int, *, train: bool) -> list[Instruction]:
        key = (train, microbatches)
        if key not in self._streams:
            if train:
                streams = build_all(
                    self.schedule, stages=self.stages, microbatches=microbatches, virtual_stages=self.virtual
                )
            else:
                streams = build_forward_only(stages=self.stages, microbatches=microbatches, virtual_stages=self.virtual)
            self._streams[key] = streams[self.stage]
        return self._streams[key]

    def _model_chunk(self, chunk: int) -> int:
        return chunk * self.stages + self.stage

    def _is_first(self, chunk: int) -> bool:
        return self._model_chunk(chunk) == 0

    def _is_last(self, chunk: int) -> bool:
        return self._model_chunk(chunk) == self.stages * self.virtual - 1

    # ------------------------------------------------------------------ interpreter

    def _run(self, stream: list[Instruction], batches, state: _StepState, *, scale: float | None) -> None:
        inputs = batches[0][0]
        seq = inputs.shape[1]
        sp = getattr(self.chunks[0], "sequence_parallel", False)
        # (S, B, H), S/tp with sequence parallelism: every message of this step has this shape.
        shape = (seq // self.tp if sp else seq, inputs.shape[0], self.d_model)
        dtype = next(self.chunks[0].parameters()).dtype
        for instr in stream:
            if isinstance(instr, Forward | Backward):
                received = self._receive(instr, state)  # waiting here is idle time, not compute
            start = time.perf_counter() if self.trace is not None else 0.0
            if isinstance(instr, Forward):
                self._forward(instr, received, batches, state, train=scale is not None, scale=scale)
                what = ("F", instr.micro, instr.chunk)
            elif isinstance(instr, Backward):
                self._backward(instr, received, state)
                what = ("B", instr.micro, instr.chunk)
            elif isinstance(instr, BackwardWeight):
                self._backward_weight(instr, state)
                what = ("W", instr.micro, instr.chunk)
            elif isinstance(instr, Exchange):
                self._exchange(instr, state, shape=shape, dtype=dtype, device=inputs.device)
                what = ("X", -1, -1)
            else:  # ReduceGrads / OptimizerStep: done by the trainer's optimizer.step
                continue
            if self.trace is not None:
                self.trace.append((*what, start, time.perf_counter()))
        for batch in state.posted:  # the last sends (and any receive no op needed: none in a valid stream)
            batch.complete()
        leftovers = (
            state.pending,
            state.weight_pending,
            state.recv_act,
            state.recv_grad,
            state.send_act,
            state.send_grad,
            state.act_batch,
            state.grad_batch,
        )
        if any(leftovers):
            raise RuntimeError(f"pipeline stage {self.stage}: step ended with unconsumed tensors")

    def _receive(self, op: Forward | Backward, state: _StepState) -> torch.Tensor | None:
        """The tensor ``op`` consumes from a neighbour (None for model chunk 0's forward and the last model
        chunk's backward), waiting for its exchange if it is still in flight."""
        key = (op.micro, op.chunk)
        if isinstance(op, Forward):
            return None if self._is_first(op.chunk) else state.take(state.recv_act, state.act_batch, key)
        return None if self._is_last(op.chunk) else state.take(state.recv_grad, state.grad_batch, key)

    def _forward(
        self, op: Forward, x: torch.Tensor | None, batches, state: _StepState, *, train: bool, scale: float | None
    ) -> None:
        key = (op.micro, op.chunk)
        model = self.chunks[op.chunk]
        ids, targets = batches[op.micro]
        if x is None:
            hidden = model.embed_tokens(ids)
        else:
            # The received activation is a leaf of this stage's graph; its gradient goes back upstream.
            hidden = x.requires_grad_(train)
        out = model.run_layers(hidden)
        if self._is_last(op.chunk):
            loss = model.loss_sum(out, targets)
            state.total += loss.detach().to(state.total.dtype)
            out = loss * scale if train else out
        else:
            state.send_act[key] = out.detach().contiguous()
        if train:
            state.pending[key] = (x, out)

    def _backward(self, op: Backward, grad: torch.Tensor | None, state: _StepState) -> None:
        key = (op.micro, op.chunk)
        x, out = state.pending.pop(key)
        if self.split_backward:
            # B: only the input's gradient, which the previous stage waits for; the graph stays for W.
            if x is not None:
                (grad_x,) = torch.autograd.grad(out, x, grad_outputs=grad, retain_graph=True)
                state.send_grad[key] = grad_x.contiguous()
            state.weight_pending[key] = (out, grad)
            return
        torch.autograd.backward(out, grad_tensors=grad)
        if x is not None:
            state.send_grad[key] = x.grad.contiguous()
        # x, out and the graph between them go out of scope here: the activations are freed.

    def _backward_weight(self, op: BackwardWeight, state: _StepState) -> None:
        """W: the weight gradients of (micro, chunk), into the optimizer's buffers through its hooks; frees
        the activations. Plain autograd has to walk the chunk's graph again to reach the weights, so the
        input-gradient GEMMs of B run a second time here (only the weight GEMMs are new): deferring the
        weight GEMMs inside each linear layer, as the zero-bubble paper's implementation does, would avoid
        that repeat, and belongs in the TP layers."""
        out, grad = state.weight_pending.pop((op.micro, op.chunk))
        params = [p for p in self.chunks[op.chunk].parameters() if p.requires_grad]
        torch.autograd.backward(out, grad_tensors=grad, inputs=params)

    def _exchange(self, ex: Exchange, state: _StepState, *, shape, dtype, device) -> None:
        ops: list[collectives.Send | collectives.Recv] = []
        arrivals: list[tuple[dict[Key, torch.Tensor], Key, torch.Tensor]] = []
        for op in ex.ops:
            key = (op.micro, op.chunk)
            if isinstance(op, SendActivation):
                ops.append(collectives.Send(state.send_act.pop(key), op.peer))
            elif isinstance(op, SendGrad):
                ops.append(collectives.Send(state.send_grad.pop(key), op.peer))
            else:
                buf = torch.empty(shape, dtype=dtype, device=device)
                ops.append(collectives.Recv(buf, op.peer))
                arrivals.append((state.recv_act if isinstance(op, RecvActivation) else state.recv_grad, key, buf))
        batch = _Batch(collectives.batch_send_recv_async(ops, self.group), [o.tensor for o in ops], arrivals)
        if not self.overlap_p2p:
            batch.complete()
            return
        state.posted.append(batch)
        for queue, key, _ in arrivals:
            (state.act_batch if queue is state.recv_act else state.grad_batch)[key] = batch
