"""Forward/backward over one optimizer step's micro-batches without pipeline parallelism.

The pipeline executor (engine/pipeline) implements the same two methods, so the trainer does not
care whether the model is split into stages.
"""

from __future__ import annotations

import torch
from torch import nn


class SingleStageRunner:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward_backward(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]], *, loss_scale: float, n_tokens: float
    ) -> torch.Tensor:
        """Back-propagate sum(token losses) * loss_scale / n_tokens per micro-batch; return the fp32
        sum of token losses over all micro-batches (the same value on every rank of the model)."""
        total = None
        for inputs, targets in batches:
            loss_sum = self.model(inputs, targets)
            (loss_sum * (loss_scale / max(n_tokens, 1.0))).backward()
            total = loss_sum.detach().float() if total is None else total + loss_sum.detach().float()
        return total

    @torch.no_grad()
    def forward_only(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
        for inputs, targets in batches:
            total += self.model(inputs, targets).double()
        return total
