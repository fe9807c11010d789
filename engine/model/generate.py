"""Sampling from a trained model (tp=1, pp=1): greedy or top-k with temperature."""

from __future__ import annotations

import torch

from engine.model.transformer import Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    top_k: int | None = 50,
    temperature: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``prompt`` (B, T) by up to ``max_new_tokens``; the context is cropped to seq_len.
    ``top_k=None`` means greedy decoding."""
    was_training = model.training
    model.eval()
    ids = prompt
    for _ in range(max_new_tokens):
        context = ids[:, -model.cfg.seq_len :]
        logits = model(context)[:, -1, :].float()  # (B, V)
        if top_k is None:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / max(temperature, 1e-5)
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    model.train(was_training)
    return ids
