"""CUDA graphs for the forward and backward of a whole (single-stage) model.

A small model on a fast GPU is bound by the host: every step launches a few thousand kernels from
Python, and the GPU idles between them. ``torch.cuda.make_graphed_callables`` captures the model's
forward and its backward once, on the first training batch's shapes, and each later micro-batch copies
its ids into the captured input buffers and replays both graphs: one launch each.

What stays eager: the loss scaling outside the model, the parameter hooks that accumulate gradients
into the fp32 flat buffers (they run when the replayed backward hands autograd the gradients), and the
optimizer. Evaluation (``model.eval()``) runs the ordinary eager forward.

Refused at start-up, with the reason: anything that needs host work or communication inside the
forward/backward (pipeline or tensor parallelism, ZeRO-3's parameter gathering, dropout's RNG forks).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import TridentConfig
from engine.errors import ConfigError


def check_supported(cfg: TridentConfig, device: torch.device) -> None:
    """Raise ConfigError naming train.cuda_graphs and the conflicting setting when graphs cannot be used."""
    if not cfg.train.cuda_graphs:
        return
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it needs a CUDA device (this run uses {device.type})")
    if cfg.parallel.pipeline > 1:
        reasons.append("parallel.pipeline > 1 (the pipeline exchanges activations between replays)")
    if cfg.parallel.tensor > 1:
        reasons.append("parallel.tensor > 1 (collectives inside the forward)")
    if cfg.zero_optimization.stage >= 3:
        reasons.append("zero_optimization.stage 3 (parameters are gathered by hooks during the forward)")
    if cfg.model.dropout > 0.0:
        reasons.append("model.dropout > 0 (dropout's RNG streams are forked on the host)")
    if reasons:
        raise ConfigError(
            "train.cuda_graphs: not available with " + "; ".join(reasons), hint="set train.cuda_graphs=false"
        )


class GraphedModel:
    """Wraps a model so that training-mode calls ``model(ids, targets)`` replay captured CUDA graphs.

    Capture happens on the first training call (its tensors give the shapes); a call with other shapes is
    an error rather than a silent re-capture. Attributes other than ``__call__`` go to the model.
    """

    def __init__(self, model: nn.Module, *, warmup_iters: int = 3) -> None:
        self.model = model
        self.warmup_iters = warmup_iters
        self._graphed = None
        self._shapes: tuple | None = None

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None or not self.model.training or not torch.is_grad_enabled():
            return self.model(ids, targets)
        shapes = (tuple(ids.shape), tuple(targets.shape))
        if self._graphed is None:
            # make_graphed_callables warms up on a side stream with autograd.grad (parameter hooks do not
            # fire, so nothing accumulates) and then captures one forward and one backward.
            self._graphed = torch.cuda.make_graphed_callables(
                self._forward_fn(),
                (ids.clone(), targets.clone()),
                num_warmup_iters=self.warmup_iters,
                allow_unused_input=True,
            )
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(
                f"train.cuda_graphs: captured for input shapes {self._shapes}, got {shapes} "
                "(every micro-batch must have the same shape)"
            )
        # the replay's output is a static buffer that the next replay overwrites: hand out a copy
        return self._graphed(ids, targets).clone()

    def _forward_fn(self):
        model = self.model

        class _Forward(nn.Module):
            # a module view of model(ids, targets) whose parameters are the model's own
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                return self.inner(ids, targets)

        return _Forward().train(model.training)
