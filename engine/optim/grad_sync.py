"""Gradient communication for the optimizer: data-parallel reduction of the flat fp32 gradients
and model-parallel sums of the squared norm, with each logical parameter counted exactly once.

``LocalGradSync`` is the single-device case (no communication). ``GradSync`` is the protocol the
optimizer relies on; the distributed implementation lives beside it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class GradSync(Protocol):
    def norm_ranges(self, group) -> list[tuple[int, int]]: ...

    def reduce_gradients(self, groups) -> None: ...

    def sum_across_model_parallel(self, value: torch.Tensor) -> torch.Tensor: ...


class LocalGradSync:
    """One device: every parameter counts in the norm, nothing to reduce."""

    def norm_ranges(self, group) -> list[tuple[int, int]]:
        return [(0, group.numel)] if group.numel else []

    def reduce_gradients(self, groups) -> None:
        pass

    def sum_across_model_parallel(self, value: torch.Tensor) -> torch.Tensor:
        return value
