"""ZB-H1, the zero-bubble schedule with 1F1B's peak memory (Qi et al. 2023, "Zero Bubble Pipeline
Parallelism", section 3.1).

The backward of a micro-batch is split into ``Backward`` (B: the gradient of the stage's input, which the
previous stage is waiting for) and ``BackwardWeight`` (W: the weight gradients, which nobody waits for).
ZB-H1 is 1F1B with each W moved later: stage s runs 1F1B's forwards and input-gradient backwards, and
after its k-th B the W of micro-batch k - s, so its W passes lag its B passes by s micro-batches. The
gradient thus travels back through the pipeline at the pace of B alone, and the lagging Ws fill the
cooldown where 1F1B idles. An activation lives from its F to its W, so stage s holds 1F1B's p - s plus s
lagging: p micro-batches, 1F1B's peak (stage 0's). With F, B and W of equal time and m >= p the bubble
is (p-1)/(3m), a third of 1F1B's (p-1)/m (``simulate`` checks it exactly).
"""

from __future__ import annotations

from engine.pipeline.instructions import Backward, BackwardWeight, Compute
from engine.pipeline.orders import one_f_one_b_order


def zb_h1_order(*, stages: int, microbatches: int, stage: int) -> list[Compute]:
    """Stage ``stage``'s compute order (F, B, W) for ZB-H1."""
    order: list[Compute] = []
    weights = 0
    for op in one_f_one_b_order(stages=stages, microbatches=microbatches, stage=stage):
        order.append(op)
        if isinstance(op, Backward) and op.micro - weights >= stage:  # W lags B by `stage` micro-batches
            order.append(BackwardWeight(weights))
            weights += 1
    # Cooldown: the lagging Ws, after the last B.
    return order + [BackwardWeight(i) for i in range(weights, microbatches)]


def zb_h1_orders(*, stages: int, microbatches: int) -> list[list[Compute]]:
    """Every stage's compute order; index = stage."""
    return [zb_h1_order(stages=stages, microbatches=microbatches, stage=s) for s in range(stages)]
