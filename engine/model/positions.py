"""Position encodings: rotary (RoPE, Su et al. 2021) and ALiBi slopes (Press et al. 2022)."""

from __future__ import annotations

import math

import torch


def rope_tables(seq_len: int, head_dim: int, *, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim/2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position angles. x: (B, h, S, hd); cos/sin: (S, hd/2)."""
    x32 = x.float().unflatten(-1, (-1, 2))  # (B, h, S, hd/2, 2)
    x_even, x_odd = x32[..., 0], x32[..., 1]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: a geometric sequence 2^(-8/n), interleaved for non-powers of two."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two_slopes(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq_len: int, *, device=None) -> torch.Tensor:
    """Causal ALiBi bias (h, S, S): slope * (j - i) for j <= i, -inf above the diagonal."""
    pos = torch.arange(seq_len, device=device)
    rel = (pos[None, :] - pos[:, None]).float()  # (S, S): j - i
    bias = slopes.to(device)[:, None, None] * rel[None]
    return bias.masked_fill(rel[None] > 0, float("-inf"))
