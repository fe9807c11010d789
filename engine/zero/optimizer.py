"""The ZeRO optimizer (Rajbhandari et al. 2019), stages 1-3, over sharded flat buckets.

One step: wait for the bucket reduce-scatters (engine/zero/reducer.py) -> sum replicated/tied parts over
TP / the embedding group -> the squared gradient norm of this rank's shards, summed over DP (disjoint
shards) and TP x PP (replicas counted once, DistGradSync.norm_ranges) -> skip on inf/nan, identically on
every rank since all see the same sum -> clip -> AdamW on the fp32 master shards -> the new compute-dtype
parameters: all-gathered into the model's buffers (stages 1-2, persistent stage-3 buckets; in collectives of
at most ``allgather_bucket_size`` elements, DeepSpeed's meaning) or kept as this rank's shard (stage 3,
gathered by engine/zero/stage3.py when a layer runs).
"""

from __future__ import annotations

import torch

from engine.distributed import collectives
from engine.optim.update import Segment, StepResult, adamw_step, check_gradients
from engine.zero.buckets import ShardedBucket
from engine.zero.reducer import BucketReducer


class ZeroOptimizer:
    def __init__(
        self,
        buckets: list[ShardedBucket],
        opt_cfg,
        *,
        stage: int,
        clip: float,
        grad_sync,
        dp_group,
        micro_batches: int,
        overlap_comm: bool,
        use_kernels: bool = False,
        gatherer=None,
        allgather_bucket_size: int = 1 << 62,
        unit_of: dict[int, int] | None = None,
        piece_numel: int | None = None,
    ) -> None:
        self.buckets = buckets
        self.cfg = opt_cfg
        self.stage = stage
        self.clip = clip
        self.sync = grad_sync
        self.dp_group = dp_group
        self.use_kernels = use_kernels
        self.gatherer = gatherer
        self.allgather_bucket_size = allgather_bucket_size
        self.applied_steps = 0
        for b in buckets:
            b.norm_segments = b.to_shard_ranges(grad_sync.norm_ranges(b))
            if getattr(grad_sync, "sequence_parallel", False) and b.replicated_start < b.numel:
                segs = b.to_shard_ranges([(b.replicated_start, b.numel)])
                b.tp_sum_segment = segs[0] if segs else None
            emb = getattr(grad_sync, "embedding_group", None)
            b.is_embedding = emb is not None and grad_sync._embedding_range(b) is not None
        done = gatherer.on_bucket_reduced if gatherer is not None else None
        self.reducer = BucketReducer(
            buckets,
            dp_group,
            stage=stage,
            micro_batches=micro_batches,
            overlap=overlap_comm,
            on_bucket_done=done,
            unit_of=unit_of,
            piece_numel=piece_numel,
        )

    def zero_grad(self) -> None:
        for b in self.buckets:
            (b.grad_full if b.grad_full is not None else b.grad).zero_()

    def _finish_reduction(self) -> None:
        self.reducer.finish()
        if self.gatherer is not None:
            self.gatherer.wait_all()
            self.gatherer.release_all()  # backward is over; gathered copies would be stale after the update
        for b in self.buckets:
            if b.tp_sum_segment is not None:  # sequence parallel: partial sums over the sequence slices
                lo, hi = b.tp_sum_segment
                collectives.all_reduce(b.grad[lo:hi], self.sync.groups.tp)
            if b.is_embedding:  # the tied copies on the first and last pipeline stage
                collectives.all_reduce(b.grad, self.sync.embedding_group)

    def _grad_sq_sum(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.buckets[0].master.device)
        for b in self.buckets:
            for lo, hi in b.norm_segments:
                seg = b.grad[lo:hi]
                total += torch.dot(seg, seg)
        collectives.all_reduce(total, self.dp_group)
        return self.sync.sum_across_model_parallel(total)

    def step(self, *, lr: float, loss_scale: float) -> StepResult:
        self._finish_reduction()
        result = check_gradients(self._grad_sq_sum().item(), loss_scale=loss_scale, clip=self.clip)
        if result.skipped:
            self.zero_grad()
            return result
        self.applied_steps += 1
        adamw_step(
            (
                Segment(b.master[lo:hi], b.grad[lo:hi], b.exp_avg[lo:hi], b.exp_avg_sq[lo:hi], wd)
                for b in self.buckets
                for lo, hi, wd in b.wd_segments
            ),
            self.cfg,
            lr=lr,
            step=self.applied_steps,
            loss_scale=loss_scale,
            result=result,
            use_kernels=self.use_kernels,
        )
        self._publish_params()
        self.zero_grad()
        return result

    def _publish_params(self) -> None:
        handles = []
        for b in self.buckets:
            if b.partitioned:
                continue
            b.own_params()
            local = b.param_full[b.lo : b.hi]
            local.copy_(b.master)
            handles.append(
                collectives.all_gather_in_pieces_async(
                    b.param_full, local, self.dp_group, max_numel=self.allgather_bucket_size
                )
            )
        for h in handles:
            h.wait()
        if self.gatherer is not None:
            self.gatherer.update_shards()

    # ------------------------------------------------------------------ accounting and state

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's persistent model states in bytes (transient gradient buckets and gathered stage-3
        layers are not model states)."""
        out = {"params": 0, "grads": 0, "optimizer": 0}
        for b in self.buckets:
            for k, v in b.model_state_bytes().items():
                out[k] += v
        return out

    def masters_from_params(self) -> None:
        """fp32 master shards := this rank's shard of the compute-dtype parameters (``load_from_fp32_weights:
        false``, DeepSpeed's meaning: masters initialised from the 16-bit model, keeping its rounding)."""
        with torch.no_grad():
            for b in self.buckets:
                if b.partitioned:
                    b.master.copy_(b.param_shard)
                    continue
                for p, (a, z), (pa, pz) in b.shard_pieces():
                    b.master[a:z].copy_(p.detach().reshape(-1)[pa:pz])

    def state_dict(self) -> dict:
        return {
            "applied_steps": self.applied_steps,
            "stage": self.stage,
            "kind": "zero",
            "dp": (self.dp_group.size, self.dp_group.rank),
            "buckets": [
                {
                    "names": [n for n, _ in b.named_params],
                    "master": b.master.clone(),
                    "exp_avg": b.exp_avg.clone(),
                    "exp_avg_sq": b.exp_avg_sq.clone(),
                    "layout": {**b.describe(), "lo": b.lo, "hi": b.hi},
                }
                for b in self.buckets
            ],
        }

    def can_load(self, state: dict) -> bool:
        """Whether ``state`` was saved by this very sharding (stage, DP size and rank, buckets): the fast,
        bit-exact path. Anything else loads through engine/checkpoint/reshard.py."""
        saved = state.get("buckets", [])
        return (
            state.get("stage") == self.stage
            and tuple(state.get("dp", ())) == (self.dp_group.size, self.dp_group.rank)
            and len(saved) == len(self.buckets)
            and all(s["names"] == [n for n, _ in b.named_params] for b, s in zip(self.buckets, saved))
        )

    def param_layouts(self) -> list[dict]:
        """One layout per bucket: what ``load_logical`` fills (every parameter the bucket touches)."""
        return [b.describe() for b in self.buckets]

    def load_logical(self, tensors: dict[str, dict[str, torch.Tensor]], *, applied_steps: int) -> None:
        """Fill this rank's shards from per-parameter fp32 tensors (name -> {"master", "exp_avg",
        "exp_avg_sq"} shaped like this rank's TP/PP part of the parameter), then publish the compute-dtype
        parameters as a step would (all-gather over DP; stage 3 keeps its shard). All DP ranks must call it."""
        if self.gatherer is not None:
            self.gatherer.wait_all()
            self.gatherer.release_all()
        for b in self.buckets:
            for key in ("master", "exp_avg", "exp_avg_sq"):
                b.fill_from(getattr(b, key), {n: t[key] for n, t in tensors.items()}, lo=b.lo, hi=b.hi)
        self.applied_steps = int(applied_steps)
        self._publish_params()

    def load_state_dict(self, state: dict) -> None:
        from engine.errors import CheckpointError

        if not self.can_load(state):
            raise CheckpointError(
                f"ZeRO state was saved with stage {state.get('stage')} on data-parallel "
                f"(size, rank) {tuple(state.get('dp', ()))}, this run has stage {self.stage} "
                f"on {(self.dp_group.size, self.dp_group.rank)} (or other buckets)",
                hint="Trainer.load reshards such checkpoints (engine/checkpoint/reshard.py)",
            )
        for b, s in zip(self.buckets, state["buckets"]):
            b.master.copy_(s["master"])
            b.exp_avg.copy_(s["exp_avg"])
            b.exp_avg_sq.copy_(s["exp_avg_sq"])
        self.applied_steps = int(state["applied_steps"])
        if self.gatherer is not None:
            self.gatherer.update_shards()
