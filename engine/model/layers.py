"""Transformer sub-layers built from TP layers: norms, attention, MLP.

Hidden states are (S, B, H) (Megatron's layout: the sequence is dim 0 so sequence parallelism shards
contiguous slices). Shapes below use h = heads on this TP rank, hd = head dim.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig
from engine.model.positions import alibi_bias, alibi_slopes, apply_rope
from engine.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, group_rank, group_size


def _kernels():
    from engine import kernels  # imported lazily: only when model.kernels is on

    return kernels


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama); weight (and bias) replicated across TP ranks."""

    def __init__(self, cfg: ModelConfig, *, use_kernels: bool) -> None:
        super().__init__()
        self.rms = cfg.arch == "llama"
        self.eps = cfg.eps
        self.use_kernels = use_kernels
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.weight.tp_replicated, self.weight.tp_dim, self.weight.tp_sizes = True, None, None
        if self.rms:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.d_model))
            self.bias.tp_replicated, self.bias.tp_dim, self.bias.tp_sizes = True, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            k = _kernels()
            if self.rms:
                return k.rms_norm(x, self.weight, eps=self.eps)
            return k.layer_norm(x, self.weight, self.bias, eps=self.eps)
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, eps=self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)): with kernels, one pass, and one for both gradients."""
        if self.use_kernels:
            k = _kernels()
            if self.rms:
                return k.add_rms_norm(x, residual, self.weight, eps=self.eps)
            return k.add_layer_norm(x, residual, self.weight, self.bias, eps=self.eps)
        total = x + residual
        return total, self(total)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layer: int,
        seed: int,
        group,
        sequence_parallel: bool,
        use_kernels: bool,
        selective_recompute: bool,
        rng=None,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        # Attention probabilities of this rank's heads are a TP region: masks must differ across TP ranks.
        self.rng = rng if tp > 1 else None
        self.cfg = cfg
        self.hd = cfg.head_dim
        self.h = cfg.n_heads // tp
        self.kv = cfg.kv_heads // tp
        self.use_kernels = use_kernels
        self.selective_recompute = selective_recompute
        bias = cfg.arch == "gpt2"
        std = cfg.init_std
        blocks = (cfg.n_heads * self.hd, cfg.kv_heads * self.hd, cfg.kv_heads * self.hd)
        self.qkv = ColumnParallelLinear(
            cfg.d_model,
            sum(blocks),
            name=f"layers.{layer}.attn.qkv",
            seed=seed,
            std=std,
            bias=bias,
            group=group,
            blocks=blocks,
            sequence_parallel=sequence_parallel,
        )
        self.out = RowParallelLinear(
            cfg.n_heads * self.hd,
            cfg.d_model,
            name=f"layers.{layer}.attn.out",
            seed=seed,
            std=std / math.sqrt(2 * cfg.n_layers),
            bias=bias,
            group=group,
            sequence_parallel=sequence_parallel,
        )
        if cfg.pos == "alibi":
            rank = group_rank(group)
            slopes = alibi_slopes(cfg.n_heads)[rank * self.h : (rank + 1) * self.h]
            self.register_buffer("alibi", slopes, persistent=False)
        else:
            self.alibi = None

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over (B, h, S, hd) q and (B, kv, S, hd) k/v -> (B, h, S, hd)."""
        dropout = self.cfg.dropout if self.training else 0.0
        if dropout > 0.0 and self.rng is not None:
            with self.rng.fork():
                return self._sdpa(q, k, v, dropout)
        if self.use_kernels and dropout == 0.0:
            return _kernels().attention(q, k, v, causal=True, alibi_slopes=self.alibi)
        return self._sdpa(q, k, v, dropout)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        if self.alibi is not None:
            bias = alibi_bias(self.alibi, q.shape[2], device=q.device).to(q.dtype)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, enable_gqa=self.kv != self.h
            )
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=self.kv != self.h)

    def _packed_core(self, qkv: torch.Tensor) -> torch.Tensor:
        """(S, B, (h + 2kv) * hd) -> (S, B, h * hd): the kernels read q/k/v and write the output and the
        qkv gradient in the model's layout, so no permute copies and no concatenation of dq/dk/dv."""
        return _kernels().attention_packed(qkv, self.h, self.kv, causal=True, alibi_slopes=self.alibi)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        qkv = self.qkv(x)  # (S, B, (h + 2kv) * hd)
        dropout = self.cfg.dropout if self.training else 0.0
        if self.use_kernels and dropout == 0.0:
            if rope is not None:
                # rotary: one pass over the packed projection, which stays in the kernels' layout
                qkv = _kernels().rope_packed(qkv, rope[0], rope[1], self.h, self.kv)
            if self.selective_recompute and self.training:
                return self.out(checkpoint(self._packed_core, qkv, use_reentrant=False))
            return self.out(self._packed_core(qkv))
        S, B = qkv.shape[0], qkv.shape[1]
        q, k, v = qkv.split((self.h * self.hd, self.kv * self.hd, self.kv * self.hd), dim=-1)
        q = q.reshape(S, B, self.h, self.hd).permute(1, 2, 0, 3)  # (B, h, S, hd)
        k = k.reshape(S, B, self.kv, self.hd).permute(1, 2, 0, 3)
        v = v.reshape(S, B, self.kv, self.hd).permute(1, 2, 0, 3)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:S], sin[:S]), apply_rope(k, cos[:S], sin[:S])
        if self.selective_recompute and self.training:
            # Recompute only the attention core (Korthikanti et al. 2022): it holds the O(S^2) activations.
            y = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            y = self.core(q, k, v)
        y = y.permute(2, 0, 1, 3).reshape(S, B, self.h * self.hd)  # (S, B, h*hd)
        return self.out(y)


class MLP(nn.Module):
    """gpt2: GELU(x W1) W2; llama: (SiLU(x Wg) * x Wu) Wd (SwiGLU, Shazeer 2020)."""

    def __init__(
        self, cfg: ModelConfig, *, layer: int, seed: int, group, sequence_parallel: bool, use_kernels: bool = False
    ) -> None:
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.use_kernels = use_kernels
        bias = cfg.arch == "gpt2"
        ffn = cfg.ffn
        blocks = (ffn, ffn) if self.swiglu else (ffn,)
        self.up = ColumnParallelLinear(
            cfg.d_model,
            sum(blocks),
            name=f"layers.{layer}.mlp.up",
            seed=seed,
            std=cfg.init_std,
            bias=bias,
            group=group,
            blocks=blocks,
            sequence_parallel=sequence_parallel,
        )
        self.down = RowParallelLinear(
            ffn,
            cfg.d_model,
            name=f"layers.{layer}.mlp.down",
            seed=seed,
            std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
            bias=bias,
            group=group,
            sequence_parallel=sequence_parallel,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and self.swiglu:
            # silu(gate) * up in one pass; the backward writes [d gate | d up] as one tensor (no concatenation)
            return self.down(_kernels().swiglu(self.up(x)))
        if self.use_kernels and self.up.bias is not None:
            # bias + GELU in one pass, and the bias gradient summed inside the GELU backward
            return self.down(_kernels().bias_gelu(self.up(x, skip_bias_add=True), self.up.bias))
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


def sequence_region(rng, sequence_parallel: bool):
    """Dropout on sequence-sharded activations is a TP region (each rank holds other tokens)."""
    return rng.fork() if (rng is not None and sequence_parallel) else contextlib.nullcontext()


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(
        self, cfg: ModelConfig, *, layer: int, seed: int, group, sequence_parallel: bool, use_kernels: bool, rng=None
    ) -> None:
        super().__init__()
        self.recompute_full = cfg.recompute == "full"
        self.ln1 = Norm(cfg, use_kernels=use_kernels)
        self.attn = Attention(
            cfg,
            layer=layer,
            seed=seed,
            group=group,
            sequence_parallel=sequence_parallel,
            use_kernels=use_kernels,
            selective_recompute=cfg.recompute == "selective",
            rng=rng,
        )
        self.ln2 = Norm(cfg, use_kernels=use_kernels)
        self.mlp = MLP(
            cfg, layer=layer, seed=seed, group=group, sequence_parallel=sequence_parallel, use_kernels=use_kernels
        )
        self.dropout = cfg.dropout
        self.rng, self.sequence_parallel = rng, sequence_parallel

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0.0):
            return x
        with sequence_region(self.rng, self.sequence_parallel):
            return F.dropout(x, self.dropout, True)

    def _forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x, h = self.ln2.add_forward(x, self._drop(self.attn(self.ln1(x), rope)))  # residual add fused into ln2
        return x + self._drop(self.mlp(h))

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.recompute_full and self.training:
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)
