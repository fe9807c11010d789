"""DeepSpeed's ZeRO knobs that change when and in what pieces parameters travel, never the math:

- ``stage3_max_reuse_distance``: blocks reused within that many gathered elements stay gathered from their
  forward to their backward, so each saves exactly its backward all-gather per micro-batch (below the
  paper's 3 Psi; all blocks kept gives 2 Psi);
- ``stage3_max_live_parameters``: the gathered elements alive at once never pass it, except for the block
  being computed (with the outer unit, which a micro-batch holds throughout);
- ``allgather_bucket_size``: stages 1-2 gather the updated parameters in collectives of at most that many
  elements, the same bytes in more calls.

Every variant gives bit-identical losses (and those of the single-device run within 1e-5).
"""

import math
import pathlib
import tempfile

from engine.zero.reducer import MAX_IN_FLIGHT
from tests.helpers import BASE, run_losses
from tests.multiproc import run_ranks
from tests.zero.zero_helpers import dp_step_traffic, zero_config

STEPS = 3
MODEL = {**BASE["model"], "n_layers": 4}  # 4 equal blocks of 12704 elements, outer unit 3648 (dp=2)
BIG = 10**9


def _config(stage: int, zero: dict):
    return zero_config(pathlib.Path(tempfile.mkdtemp()), stage=stage, steps=STEPS, model=MODEL, zero_optimization=zero)


def _worker(rank, world, args):
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    out = {}
    for name, stage, zero in args["variants"]:
        cfg = _config(stage, zero)
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        trainer = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
        traffic = dp_step_traffic(trainer, ctx)
        g = trainer.optimizer.gatherer
        out[name] = {
            "losses": [r["loss"] for r in trainer.history],
            "bytes": traffic["bytes"],
            "calls": traffic["calls"],
            "accum": trainer.batch.grad_accum,
            "shards": [b.shard_numel for b in trainer.optimizer.buckets],
            "units": [sum(b.padded_numel for b in u) for u in g.units] if g else [],
            "kept": sorted(g.kept) if g else [],
            "peak": g.peak_live_numel if g else 0,
        }
    return out


def _variants(units: list[int]):
    outer, block = units[0], units[1]
    return [
        ("release", 3, {"stage3_max_reuse_distance": 0}),
        ("keep_last", 3, {"stage3_max_reuse_distance": outer + 1}),  # the last block's distance is the head's
        ("keep_all", 3, {"stage3_max_reuse_distance": BIG}),
        ("keep_capped", 3, {"stage3_max_reuse_distance": BIG, "stage3_max_live_parameters": outer + 2 * block}),
        ("live_min", 3, {"stage3_max_live_parameters": 1}),
        ("live_two", 3, {"stage3_max_live_parameters": outer + 2 * block}),
        ("s1", 1, {}),
        ("s1_pieces", 1, {"allgather_bucket_size": 1000}),
        ("s2", 2, {}),
        ("s2_pieces", 2, {"allgather_bucket_size": 1000}),
    ]


# what _variants needs before the run: the unit sizes of MODEL at dp=2 (asserted against the run below)
UNITS = [3648, 12704, 12704, 12704, 12704]


def test_stage3_reuse_distance_live_cap_and_allgather_pieces(tmp_path):
    results = run_ranks(_worker, 2, args={"variants": _variants(UNITS)}, timeout_s=600)
    ref = run_losses(zero_config(tmp_path, stage=0, steps=STEPS, model=MODEL))
    for rank, res in enumerate(results):
        base = res["release"]
        assert base["units"] == UNITS, "the model's unit sizes changed: update UNITS"
        for name, got in res.items():
            assert got["losses"] == base["losses"], (name, rank)  # only the traffic's timing changes
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(base["losses"], ref)), (base["losses"], ref)
        outer, blocks, accum = UNITS[0], UNITS[1:], base["accum"]
        padded = sum(UNITS)

        # max_reuse_distance: 0 keeps nothing (3 Psi: every block gathered for forward and for backward) ...
        assert base["kept"] == []
        assert base["bytes"]["all_gather"] == 4 * accum * (2 * padded - outer)
        # ... just above the last block's distance keeps only it; a large distance keeps every block (2 Psi)
        saved = {
            name: base["bytes"]["all_gather"] - res[name]["bytes"]["all_gather"]
            for name in ("keep_last", "keep_all", "keep_capped")
        }
        assert res["keep_last"]["kept"] == [4] and saved["keep_last"] == 4 * accum * blocks[-1]
        assert res["keep_all"]["kept"] == [1, 2, 3, 4] and saved["keep_all"] == 4 * accum * sum(blocks)
        assert (
            res["keep_all"]["bytes"]["all_gather"] == res["keep_all"]["bytes"]["reduce_scatter"] == 4 * accum * padded
        )
        # ... unless the live cap stops the kept suffix: outer + two blocks fit
        assert res["keep_capped"]["kept"] == [3, 4] and saved["keep_capped"] == 4 * accum * sum(blocks[-2:])
        assert res["keep_capped"]["peak"] <= outer + 2 * blocks[0]

        # max_live_parameters: the same bytes; prefetch stops at the cap, the computed block always gathers
        for name in ("live_min", "live_two"):
            assert res[name]["bytes"] == base["bytes"] and res[name]["kept"] == [], name
        assert res["live_min"]["peak"] == outer + max(blocks)  # no prefetch at all
        assert res["live_two"]["peak"] == outer + 2 * blocks[0]  # one block prefetched ahead
        assert base["peak"] > outer + 2 * blocks[0]  # unbounded, the 20000-element prefetch goes further

        # allgather_bucket_size: stages 1-2 gather each bucket in pieces of <= 1000 elements (500 per rank)
        for stage in ("s1", "s2"):
            whole, pieces = res[stage], res[f"{stage}_pieces"]
            assert pieces["bytes"] == whole["bytes"], stage
            assert whole["calls"]["all_gather"] == len(whole["shards"])
            assert (
                pieces["calls"]["all_gather"] == sum(math.ceil(s / 500) for s in whole["shards"]) > len(whole["shards"])
            )


BLOCK = UNITS[1]  # elements of one block
ONE_BUCKET_VARIANTS = {  # name: (stage, reduce_bucket_size)
    "s1": (1, BIG),  # one bucket, reduced once per step
    "s2_whole": (2, BIG),  # DeepSpeed's default size: the model is one piece, reduced once per micro-batch
    "s2_blocks": (2, BLOCK),  # pieces of at most one block: reduced block by block as backward ends each
}


def _one_bucket_worker(rank, world, args):
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    out = {}
    for name, (stage, size) in ONE_BUCKET_VARIANTS.items():
        cfg = zero_config(
            pathlib.Path(tempfile.mkdtemp()),
            stage=stage,
            model=MODEL,
            train_batch_size=16,
            zero_optimization={"reduce_bucket_size": size},
        )  # 2 micro-batches per rank
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        trainer = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
        traffic = dp_step_traffic(trainer, ctx)
        out[name] = {
            "losses": [r["loss"] for r in trainer.history],
            "traffic": traffic,
            "accum": trainer.batch.grad_accum,
            "peak_staged": trainer.optimizer.reducer.peak_staged_numel,
            "padded": [b.padded_numel for b in trainer.optimizer.buckets],
        }
    return out


def test_stage2_reduces_one_bucket_in_pieces_of_reduce_bucket_size(tmp_path):
    """Stage 2 with overlap_comm lays the model out as one bucket and reduce-scatters it in backward-ordered
    pieces of whole units of at most reduce_bucket_size elements (DeepSpeed's elements reduced at a time),
    with uneven per-rank sizes (dp=4 puts shard boundaries inside units): at DeepSpeed's default size the
    model is one piece, at one block's size each unit is its own piece. Every variant: 20 steps equal to
    the single-device run, the same bytes as one collective per bucket. Stage 1 reduces once per step."""
    results = run_ranks(_one_bucket_worker, 4, args={}, timeout_s=600)
    ref = run_losses(zero_config(tmp_path, stage=0, model=MODEL, train_batch_size=16))
    pieces = {"s1": 1, "s2_whole": 1, "s2_blocks": 5}  # outer unit + 4 blocks
    for rank, res in enumerate(results):
        for name, got in res.items():
            assert got["accum"] == 2
            assert len(got["padded"]) == 1, "one bucket"
            assert len(got["losses"]) == len(ref)
            assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got["losses"], ref)), (name, rank)
            padded, reductions = got["padded"][0], 1 if name == "s1" else got["accum"]
            assert got["traffic"]["bytes"] == {
                "reduce_scatter": 4 * padded * reductions,
                "all_gather": 4 * padded,
                "all_reduce": 12,
            }, (name, rank)
            assert got["traffic"]["calls"]["reduce_scatter"] == pieces[name] * reductions, (name, rank)
        # transient fp32 gradients: the whole model when it is one piece (twice: the first micro-batch's
        # reduction is still in flight when the second's backward fills the next); with block-sized pieces
        # only the pieces in flight (the outer unit's waits for the embedding's gradient, at the end)
        outer = UNITS[0]
        assert res["s2_whole"]["peak_staged"] == 2 * res["s2_whole"]["padded"][0], rank
        assert res["s2_blocks"]["peak_staged"] == outer + (MAX_IN_FLIGHT + 1) * BLOCK < res["s2_blocks"]["padded"][0]
