"""Decoder-only transformer (GPT-2 / Llama style) built from TP layers and kernels.

It knows nothing of pipeline parallelism or ZeRO: a pipeline stage is simply a ``Transformer`` built
with ``first``/``last`` flags and a slice of ``layer_ids``. Hidden states are (S, B, H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model.layers import Block, Norm, sequence_region
from engine.model.positions import rope_tables
from engine.tensor_parallel import mappings
from engine.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.tensor_parallel.init import normal_full
from engine.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, group_size

IGNORE_INDEX = -100


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of tp; the padding rows are never predicted."""
    return -(-vocab_size // tp) * tp


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        seed: int,
        tp_group=None,
        sequence_parallel: bool = False,
        use_kernels: bool = False,
        first: bool = True,
        last: bool = True,
        layer_ids: list[int] | None = None,
        rng=None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.use_kernels = use_kernels
        self.first, self.last = first, last
        self.layer_ids = list(range(cfg.n_layers)) if layer_ids is None else list(layer_ids)
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, group_size(tp_group))
        sp = self.sequence_parallel
        # The tied head on the last stage holds its own copy of the embedding (same init: same name).
        if first or (last and cfg.tie_embeddings):
            self.embed = VocabParallelEmbedding(
                cfg.vocab_size,
                cfg.d_model,
                padded_vocab=self.padded_vocab,
                name="embed",
                seed=seed,
                std=cfg.init_std,
                group=tp_group,
                sequence_parallel=sp,
            )
        if first and cfg.pos == "learned":
            self.pos_embed = nn.Parameter(
                normal_full((cfg.seq_len, cfg.d_model), std=cfg.init_std, seed=seed, name="pos_embed.weight")
            )
            self.pos_embed.tp_replicated, self.pos_embed.tp_dim, self.pos_embed.tp_sizes = True, None, None
        self.layers = nn.ModuleList(
            Block(cfg, layer=i, seed=seed, group=tp_group, sequence_parallel=sp, use_kernels=use_kernels, rng=rng)
            for i in self.layer_ids
        )
        self.rng = rng
        if last:
            self.final_norm = Norm(cfg, use_kernels=use_kernels)
            if not cfg.tie_embeddings:
                self.head = ColumnParallelLinear(
                    cfg.d_model, self.padded_vocab, name="head", seed=seed, std=cfg.init_std, bias=False, group=tp_group
                )
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, theta=cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # -------------------------------------------------------------- pieces (the pipeline calls these)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (S, B, H) hidden states (S/tp with sequence parallelism)."""
        S = ids.shape[1]
        if S > self.cfg.seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds model.seq_len={self.cfg.seq_len}")
        ids = ids.t()  # (S, B)
        x = self.embed(ids)
        if self.cfg.pos == "learned":
            if self.sequence_parallel:
                # This rank's slice of positions; the replicated pos_embed's partial gradients are summed
                # over the TP group with the other replicated parameters (DistGradSync).
                chunk = S // self.tp_group.size
                x = x + self.pos_embed[self.tp_group.rank * chunk : (self.tp_group.rank + 1) * chunk].unsqueeze(1)
            else:
                x = x + self.pos_embed[:S].unsqueeze(1)  # (S, 1, H) broadcast over the batch
        if not (self.training and self.cfg.dropout > 0.0):
            return x
        with sequence_region(self.rng, self.sequence_parallel):
            return F.dropout(x, self.cfg.dropout, True)

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        rope = (self.rope_cos, self.rope_sin) if self.cfg.pos == "rope" else None
        for block in self.layers:
            x = block(x, rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(S, B, H) -> (S, B, V_local) logits for this TP rank's vocabulary slice."""
        x = self.final_norm(x)
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_region(x, self.tp_group)
        else:
            x = mappings.copy_to_tensor_region(x, self.tp_group)
        weight = self.embed.weight if self.cfg.tie_embeddings else self.head.weight
        return F.linear(x, weight)

    def loss_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of per-token cross-entropy over targets != IGNORE_INDEX (fp32 scalar)."""
        logits = self.logits(x)  # (S, B, Vl)
        start = (self.tp_group.rank if group_size(self.tp_group) > 1 else 0) * logits.shape[-1]
        if self.use_kernels and group_size(self.tp_group) == 1 and self.padded_vocab == self.cfg.vocab_size:
            from engine import kernels

            # the logits are dead after the loss: their storage takes the gradient (no second V-wide tensor)
            return kernels.cross_entropy(
                logits.flatten(0, 1),
                targets.t().flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
                inplace_backward=True,
            )
        losses = vocab_parallel_cross_entropy(
            logits.flatten(0, 1),
            targets.t().flatten(),
            group=self.tp_group,
            vocab_start=start,
            vocab_size=self.cfg.vocab_size,
            ignore_index=IGNORE_INDEX,
        )
        return losses.sum()

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Whole model (first and last stage): loss sum if targets are given, else full-vocab logits."""
        x = self.run_layers(self.embed_tokens(ids))
        if targets is not None:
            return self.loss_sum(x, targets)
        if group_size(self.tp_group) > 1:
            raise NotImplementedError("full logits are only gathered for tp=1 (generation)")
        return self.logits(x).transpose(0, 1)[..., : self.cfg.vocab_size]  # (B, S, V)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the full (unsharded, unpadded) model, by kind."""
    H, L, V, F_ = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.ffn
    hd, kv = cfg.head_dim, cfg.kv_heads
    bias = cfg.arch == "gpt2"
    attn = H * (cfg.n_heads * hd + 2 * kv * hd) + cfg.n_heads * hd * H
    attn += (cfg.n_heads * hd + 2 * kv * hd + H) if bias else 0
    mlp = (3 * H * F_) if cfg.arch == "llama" else (2 * H * F_ + (F_ + H if bias else 0))
    norms = (2 * H if bias else H) * (2 * L + 1)
    embed = V * H
    pos = cfg.seq_len * H if cfg.pos == "learned" else 0
    head = 0 if cfg.tie_embeddings else V * H
    total = L * (attn + mlp) + norms + embed + pos + head
    return {"total": total, "embedding": embed + pos + head, "non_embedding": total - embed - pos - head}
