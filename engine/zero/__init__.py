"""ZeRO stages 1-3 (Rajbhandari et al. 2019): optimizer states, gradients and parameters sharded across
the data-parallel group over flat buckets. ``build_zero_optimizer`` is the factory the trainer uses."""

from __future__ import annotations

from engine.zero.factory import build_zero_optimizer, check_zero_layout

__all__ = ["build_zero_optimizer", "check_zero_layout"]
