"""The optimizer wrapper: fp32 master weights and gradient accumulation over flat buffers,
loss-scale unscaling with overflow skip, global-norm clipping and AdamW, then copy-back to the
compute-dtype model (DeepSpeed's FP16/BF16 optimizer, Micikevicius et al. 2018).

Communication is delegated to a ``GradSync`` (see engine/optim/grad_sync.py): it reduces gradients
across data-parallel ranks and sums squared norms / overflow flags across model-parallel ranks. The
ZeRO optimizer (engine/zero) shards these same flat buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import OptimizerConfig
from engine.optim.flat import FlatGroup
from engine.optim.grad_sync import GradSync, LocalGradSync
from engine.optim.param_groups import split_decay
from engine.optim.update import Segment, StepResult, adamw_step, check_gradients


class MixedPrecisionOptimizer:
    def __init__(
        self,
        model: nn.Module,
        opt_cfg: OptimizerConfig,
        *,
        clip: float,
        decay_embeddings: bool,
        use_kernels: bool = False,
        grad_sync: GradSync | None = None,
        reduce_bucket_size: int = 500_000_000,
        overlap_comm: bool = False,
        micro_batches: int = 1,
    ) -> None:
        self.cfg = opt_cfg
        self.clip = clip
        self.use_kernels = use_kernels
        self.sync = grad_sync or LocalGradSync()
        decay, no_decay = split_decay(list(model.named_parameters()), decay_embeddings=decay_embeddings)
        wd = opt_cfg.params.weight_decay
        self.groups = [g for g in (FlatGroup(decay, weight_decay=wd), FlatGroup(no_decay, weight_decay=0.0)) if g.numel]
        for g in self.groups:
            # Aliased while the model is fp32; the trainer's later cast to bf16/fp16 gives the parameters
            # their own storage, and copy_master_to_params then copies (it skips aliased views).
            g.alias_params_to_master()
            g.exp_avg = torch.zeros_like(g.master)
            g.exp_avg_sq = torch.zeros_like(g.master)
            g.norm_ranges = self.sync.norm_ranges(g)
        self.applied_steps = 0
        dp_group = getattr(self.sync, "dp_group", None)
        self.dp_reduce = None
        if dp_group is not None:
            from engine.optim.grad_sync import OverlappedDPReduce

            self.dp_reduce = OverlappedDPReduce(
                self.groups, dp_group, bucket_size=reduce_bucket_size, micro_batches=micro_batches, overlap=overlap_comm
            )
        # Which parameters' fp32 gradient views hold this step's gradient. A view not yet written is
        # logically zero: its first gradient of the step is copied in (one read of the compute-dtype
        # gradient, one fp32 write) instead of added onto a zeroed buffer, so zero_grad needs no memset
        # and the first micro-batch does not read the fp32 buffer. Views still unwritten when the step
        # begins (parameters that got no gradient) are zeroed then.
        pairs = [(p, view) for g in self.groups for p, view in g.views(g.grad)]
        self._views = [view for _, view in pairs]
        self._written = [False] * len(pairs)
        # Gradients handed over by autograd, not yet in the fp32 buffer: moved in batches (one foreach copy
        # and one foreach add for many parameters instead of a launch per parameter from Python), when
        # FLUSH_ELEMENTS have gathered and at the end of each backward pass.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._pending_numel = 0
        self._flush_queued = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, (p, _) in enumerate(pairs)]

    # compute-dtype gradient elements held back before a batched move into the fp32 buffer (32 MiB of bf16):
    # small enough that data-parallel buckets still complete, and reduce, while backward runs
    FLUSH_ELEMENTS = 1 << 24

    def _make_hook(self, index: int):
        # Take the compute-dtype gradient as soon as autograd has it (dropping p.grad), to be accumulated in
        # fp32 with the next batch: accumulation across micro-batches happens in fp32.
        def hook(p: torch.Tensor) -> None:
            grad, p.grad = p.grad, None
            self._pending.append((index, p, grad))
            self._pending_numel += grad.numel()
            if not self._flush_queued:
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._flush_at_end_of_backward)
            if self._pending_numel >= self.FLUSH_ELEMENTS:
                self._flush()

        return hook

    def _flush_at_end_of_backward(self) -> None:
        self._flush_queued = False
        self._flush()

    def _flush(self) -> None:
        """Move the pending gradients into their fp32 views (copy on a view's first gradient of the step, else
        add), then tell the data-parallel reducer which parameters are done."""
        pending, self._pending, self._pending_numel = self._pending, [], 0
        if not pending:
            return
        copy_dst, copy_src, add_dst, add_src = [], [], [], []
        for index, _, grad in pending:
            if self._written[index]:
                add_dst.append(self._views[index])
                add_src.append(grad)
            else:
                copy_dst.append(self._views[index])
                copy_src.append(grad)
                self._written[index] = True
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)
        if self.dp_reduce is not None:
            for _, p, _ in pending:
                self.dp_reduce.on_grad(p)

    def _zero_unwritten(self) -> None:
        self._flush()  # nothing is pending after a backward; kept for callers between hooks and its end
        for i, view in enumerate(self._views):
            if not self._written[i]:
                view.zero_()
                self._written[i] = True

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's model states: parameters (the masters when aliased), fp32 gradients, Adam moments
        (+ masters when the parameters have their own compute-dtype storage)."""
        params = sum(p.numel() * p.element_size() for g in self.groups for _, p in g.named_params)
        aliased = all(p.data_ptr() == v.data_ptr() for g in self.groups for p, v in g.views(g.master))
        master = 0 if aliased else sum(g.master.numel() * 4 for g in self.groups)
        return {
            "params": params,
            "grads": sum(g.grad.numel() * 4 for g in self.groups),
            "optimizer": master + sum(8 * g.master.numel() for g in self.groups),
        }

    def flatten_compute_params(self) -> None:
        """After the model's cast to bf16/fp16: one flat compute buffer per group (see FlatGroup)."""
        for g in self.groups:
            g.alias_params_to_compute()

    def zero_grad(self) -> None:
        """Make every fp32 gradient logically zero: the next gradient of each parameter overwrites its view."""
        for i in range(len(self._written)):
            self._written[i] = False

    def _grad_sq_sum(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.groups[0].grad.device)
        for g in self.groups:
            for start, end in g.norm_ranges:
                seg = g.grad[start:end]
                total += torch.dot(seg, seg)
        return total

    def step(self, *, lr: float, loss_scale: float) -> StepResult:
        """Reduce, unscale, check, clip, update. Leaves gradients (logically) zeroed."""
        self._zero_unwritten()
        if self.dp_reduce is not None:
            self.dp_reduce.finish()
        self.sync.reduce_gradients(self.groups, data_parallel=self.dp_reduce is None)
        sq = self.sync.sum_across_model_parallel(self._grad_sq_sum())
        result = check_gradients(sq.item(), loss_scale=loss_scale, clip=self.clip)
        if result.skipped:
            self.zero_grad()
            return result
        self.applied_steps += 1
        # the fused kernel writes the new compute-dtype weights straight into the model's flat storage
        fused = [g.compute if self.use_kernels and g.compute_aliased() else None for g in self.groups]
        adamw_step(
            [
                Segment(g.master, g.grad, g.exp_avg, g.exp_avg_sq, g.weight_decay, out)
                for g, out in zip(self.groups, fused)
            ],
            self.cfg,
            lr=lr,
            step=self.applied_steps,
            loss_scale=loss_scale,
            result=result,
            use_kernels=self.use_kernels,
        )
        for g, out in zip(self.groups, fused):
            if out is None:
                g.copy_master_to_params()
        self.zero_grad()
        return result

    def masters_from_params(self) -> None:
        """fp32 masters := the compute-dtype parameters (``load_from_fp32_weights: false``: DeepSpeed then
        initialises the masters from the 16-bit model, keeping its rounding). No-op when they alias."""
        with torch.no_grad():
            for g in self.groups:
                for p, view in g.views(g.master):
                    if p.data_ptr() != view.data_ptr():
                        view.copy_(p)

    def state_dict(self) -> dict:
        return {
            "applied_steps": self.applied_steps,
            "kind": "flat",
            "groups": [
                {
                    "names": [n for n, _ in g.named_params],
                    "master": g.master.clone(),
                    "exp_avg": g.exp_avg.clone(),
                    "exp_avg_sq": g.exp_avg_sq.clone(),
                    "layout": g.describe(),
                }
                for g in self.groups
            ],
        }

    def can_load(self, state: dict) -> bool:
        """Whether ``state`` has exactly this optimizer's flat layout (the fast, bit-exact path)."""
        saved = state.get("groups", [])
        return len(saved) == len(self.groups) and all(
            s["names"] == [n for n, _ in g.named_params] for g, s in zip(self.groups, saved)
        )

    def param_layouts(self) -> list[dict]:
        """One ``FlatLayout.describe()`` per flat buffer: what ``load_logical`` fills."""
        return [g.describe() for g in self.groups]

    def load_logical(self, tensors: dict[str, dict[str, torch.Tensor]], *, applied_steps: int) -> None:
        """Fill the flat states from per-parameter fp32 tensors (name -> {"master", "exp_avg", "exp_avg_sq"},
        shaped like this rank's parameter) and copy the masters into the model: the resharding load."""
        for g in self.groups:
            for key in ("master", "exp_avg", "exp_avg_sq"):
                g.fill_from(getattr(g, key), {n: t[key] for n, t in tensors.items()})
            g.copy_master_to_params()
        self.applied_steps = int(applied_steps)

    def load_state_dict(self, state: dict) -> None:
        from engine.errors import CheckpointError

        if len(state["groups"]) != len(self.groups):
            raise CheckpointError("optimizer state has a different number of parameter groups")
        for g, s in zip(self.groups, state["groups"]):
            names = [n for n, _ in g.named_params]
            if s["names"] != names:
                bad = next((a for a, b in zip(names, s["names"]) if a != b), names[len(s["names"]) :][:1])
                raise CheckpointError(f"optimizer state does not match the model at parameter {bad}")
            g.master.copy_(s["master"])
            g.exp_avg.copy_(s["exp_avg"])
            g.exp_avg_sq.copy_(s["exp_avg_sq"])
            g.copy_master_to_params()
        self.applied_steps = int(state["applied_steps"])
