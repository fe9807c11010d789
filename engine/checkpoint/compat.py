"""Loading a model state with errors that name the mismatching tensor."""

from __future__ import annotations

from torch import nn

from engine.errors import CheckpointError


def load_model_state(model: nn.Module, state: dict, *, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(
            f"{path}: checkpoint does not fit this model ({what})",
            hint="same model config and parallel layout as the run that saved it",
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)} in the checkpoint, "
                f"{tuple(tensor.shape)} in this model"
            )
    model.load_state_dict(state)
