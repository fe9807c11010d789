"""Which parameters get weight decay: matrices only; never biases, norm weights or (by default)
embeddings (GPT-3 / Chinchilla practice)."""

from __future__ import annotations

from torch import nn

EMBEDDING_NAMES = ("embed.weight", "pos_embed")


def is_embedding(name: str) -> bool:
    return any(name == e or name.endswith("." + e) for e in EMBEDDING_NAMES)


def split_decay(
    named_params: list[tuple[str, nn.Parameter]], *, decay_embeddings: bool = False
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decay, no_decay) lists of (name, param), in model order."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and (decay_embeddings or not is_embedding(name)):
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    return decay, no_decay
