"""The whole model in one file beside a checkpoint (DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``).

The shards of a checkpoint of any layout are gathered into the single-device model's state dict
(engine/checkpoint/gather.py: TP shards rejoined, pipeline stages renamed to global layers, vocabulary padding
dropped) and written in the compute dtype as ``<step dir>/model_16bit.safetensors``, through a temporary
name and a rename, so the file is complete or absent.
"""

from __future__ import annotations

import os

import torch

CONSOLIDATED_NAME = "model_16bit.safetensors"


def write_16bit_model(path: str, *, dtype: torch.dtype) -> str:
    """Gather checkpoint ``path`` and write its model in ``dtype``; returns the file written."""
    from safetensors.torch import save_file

    from engine.checkpoint.gather import gather_full_state

    full, _ = gather_full_state(path)
    out = os.path.join(path, CONSOLIDATED_NAME)
    tmp = out + ".tmp"
    # clone: a tied head shares the embedding's storage, which safetensors refuses
    save_file({name: t.to(dtype).clone() for name, t in full.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, out)
    return out
