"""ZeRO stages 1-3 (Rajbhandari et al. 2019): optimizer states, gradients and parameters sharded across
the data-parallel group over flat buckets. ``build_zero_optimizer`` is the factory the trainer uses.

Every stage composes with tensor and pipeline parallelism (and virtual stages), proven equal to the
single-device run by tests/zero/: unlike DeepSpeed, which refuses ZeRO-2/3 with pipeline parallelism, the
reducer counts gradient hooks per bucket, so the pipeline's interleaved micro-batches reduce-scatter exactly
once each (engine/zero/reducer.py), and stage 3 gathers by module hooks that fire inside the executor's piece
calls (engine/zero/stage3.py)."""

from __future__ import annotations

from engine.zero.factory import build_zero_optimizer

__all__ = ["build_zero_optimizer"]
