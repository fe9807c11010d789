"""Sizing a run before it starts: parameters, FLOPs, memory per ZeRO stage, traffic and time (``engine.plan``)."""

from engine.planning.estimate import (
    activation_bytes_per_layer,
    plan,
    stage3_kept_elements,
    zero_comm_elements_per_step,
    zero_model_state_breakdown,
    zero_model_state_bytes,
)

__all__ = [
    "activation_bytes_per_layer",
    "plan",
    "stage3_kept_elements",
    "zero_comm_elements_per_step",
    "zero_model_state_breakdown",
    "zero_model_state_bytes",
]
