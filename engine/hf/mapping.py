"""Trident <-> transformers parameter mapping for GPT-2 (GPT2LMHeadModel) and Llama (LlamaForCausalLM).

Both directions work on *full* state dicts: Trident names as a tp=1 ``Transformer`` has them (vocabulary
unpadded), transformers names as ``save_pretrained`` writes them. Conventions bridged here:

* Trident's ``attn.qkv`` is the row-concatenation [q; k; v] (q: n_heads*hd rows, k and v: kv_heads*hd);
  Llama keeps separate q/k/v projections, GPT-2 one ``c_attn`` with the same [q; k; v] order.
* GPT-2's ``Conv1D`` stores weights as (in, out): every GPT-2 matrix is the transpose of Trident's.
* RoPE: Trident rotates interleaved pairs (x[2i], x[2i+1]); transformers' Llama rotates halves
  (x[i], x[i + hd/2]). Both use frequency theta^(-2i/hd) for pair i, so permuting the rows of each q and
  k head (Trident row 2i -> HF row i, 2i+1 -> i + hd/2) gives identical attention scores (q.k is
  invariant under the same permutation of both). v and the output projection are untouched.
* GPT-2 uses the tanh GELU (``gelu_new``), as Trident's gpt2 MLP does.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def check_exportable(m: ModelConfig) -> None:
    """Refuse (by key) model settings transformers' GPT2/Llama classes cannot express."""
    if m.arch == "gpt2":
        if m.pos != "learned":
            raise ConfigError(f"model.position: GPT2LMHeadModel needs learned positions, the model uses {m.pos}")
        if m.kv_heads != m.n_heads:
            raise ConfigError(
                "model.n_kv_heads: GPT2LMHeadModel has no grouped-query attention",
                hint="export GQA models with arch llama",
            )
    elif m.pos != "rope":
        raise ConfigError(f"model.position: LlamaForCausalLM needs rope, the model uses {m.pos}")


def rope_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order taking Trident's interleaved-pair q/k rows to transformers' half-split order."""
    half = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))  # (hd,)
    return (torch.arange(n_heads)[:, None] * head_dim + half[None, :]).reshape(-1)  # (n_heads * hd,)


def _split_qkv(m: ModelConfig, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hd = m.head_dim
    return t.split((m.n_heads * hd, m.kv_heads * hd, m.kv_heads * hd), dim=0)


def to_hf(m: ModelConfig, sd: Tensors) -> Tensors:
    """Full Trident state dict -> transformers state dict (contiguous fp tensors)."""
    check_exportable(m)
    out = _gpt2_to_hf(m, sd) if m.arch == "gpt2" else _llama_to_hf(m, sd)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(m: ModelConfig, hf: Tensors) -> Tensors:
    """transformers state dict -> full Trident state dict (unpadded vocabulary)."""
    check_exportable(m)
    return _gpt2_from_hf(m, hf) if m.arch == "gpt2" else _llama_from_hf(m, hf)


# ---------------------------------------------------------------- GPT-2


def _gpt2_to_hf(m: ModelConfig, sd: Tensors) -> Tensors:
    out = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.wpe.weight": sd["pos_embed"],
        "transformer.ln_f.weight": sd["final_norm.weight"],
        "transformer.ln_f.bias": sd["final_norm.bias"],
    }
    for i in range(m.n_layers):
        t, h = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{h}{theirs}.weight"] = sd[f"{t}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = sd[f"{t}{ours}.bias"]
        for ours, theirs in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.out", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ):
            out[f"{h}{theirs}.weight"] = sd[f"{t}{ours}.weight"].t()  # Conv1D: (in, out)
            out[f"{h}{theirs}.bias"] = sd[f"{t}{ours}.bias"]
    out["lm_head.weight"] = sd["embed.weight"] if m.tie_embeddings else sd["head.weight"]
    return out


def _gpt2_from_hf(m: ModelConfig, hf: Tensors) -> Tensors:
    hf = {k.removeprefix("transformer.") if k.startswith("transformer.") else k: v for k, v in hf.items()}
    sd = {
        "embed.weight": hf["wte.weight"],
        "pos_embed": hf["wpe.weight"][: m.seq_len],
        "final_norm.weight": hf["ln_f.weight"],
        "final_norm.bias": hf["ln_f.bias"],
    }
    for i in range(m.n_layers):
        t, h = f"layers.{i}.", f"h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            sd[f"{t}{ours}.weight"] = hf[f"{h}{theirs}.weight"]
            sd[f"{t}{ours}.bias"] = hf[f"{h}{theirs}.bias"]
        for ours, theirs in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.out", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ):
            sd[f"{t}{ours}.weight"] = hf[f"{h}{theirs}.weight"].t()
            sd[f"{t}{ours}.bias"] = hf[f"{h}{theirs}.bias"]
    if not m.tie_embeddings:
        sd["head.weight"] = hf.get("lm_head.weight", hf["wte.weight"])
    return sd


# ---------------------------------------------------------------- Llama


def _llama_to_hf(m: ModelConfig, sd: Tensors) -> Tensors:
    q_rows, k_rows = rope_rows(m.n_heads, m.head_dim), rope_rows(m.kv_heads, m.head_dim)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["final_norm.weight"]}
    for i in range(m.n_layers):
        t, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(m, sd[f"{t}attn.qkv.weight"])
        gate, up = sd[f"{t}mlp.up.weight"].chunk(2, dim=0)
        out.update(
            {
                f"{h}input_layernorm.weight": sd[f"{t}ln1.weight"],
                f"{h}post_attention_layernorm.weight": sd[f"{t}ln2.weight"],
                f"{h}self_attn.q_proj.weight": q[q_rows],
                f"{h}self_attn.k_proj.weight": k[k_rows],
                f"{h}self_attn.v_proj.weight": v,
                f"{h}self_attn.o_proj.weight": sd[f"{t}attn.out.weight"],
                f"{h}mlp.gate_proj.weight": gate,
                f"{h}mlp.up_proj.weight": up,
                f"{h}mlp.down_proj.weight": sd[f"{t}mlp.down.weight"],
            }
        )
    out["lm_head.weight"] = sd["embed.weight"] if m.tie_embeddings else sd["head.weight"]
    return out


def _llama_from_hf(m: ModelConfig, hf: Tensors) -> Tensors:
    # Inverse permutations: HF row r came from Trident row rows[r].
    q_inv = torch.argsort(rope_rows(m.n_heads, m.head_dim))
    k_inv = torch.argsort(rope_rows(m.kv_heads, m.head_dim))
    sd = {"embed.weight": hf["model.embed_tokens.weight"], "final_norm.weight": hf["model.norm.weight"]}
    for i in range(m.n_layers):
        t, h = f"layers.{i}.", f"model.layers.{i}."
        q = hf[f"{h}self_attn.q_proj.weight"][q_inv]
        k = hf[f"{h}self_attn.k_proj.weight"][k_inv]
        sd.update(
            {
                f"{t}ln1.weight": hf[f"{h}input_layernorm.weight"],
                f"{t}ln2.weight": hf[f"{h}post_attention_layernorm.weight"],
                f"{t}attn.qkv.weight": torch.cat((q, k, hf[f"{h}self_attn.v_proj.weight"])),
                f"{t}attn.out.weight": hf[f"{h}self_attn.o_proj.weight"],
                f"{t}mlp.up.weight": torch.cat((hf[f"{h}mlp.gate_proj.weight"], hf[f"{h}mlp.up_proj.weight"])),
                f"{t}mlp.down.weight": hf[f"{h}mlp.down_proj.weight"],
            }
        )
    if not m.tie_embeddings:
        sd["head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    return sd


# ---------------------------------------------------------------- configs


def hf_config(
    m: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None
) -> dict:
    """config.json for transformers (written by hand: exporting does not need transformers installed)."""
    tokens = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if m.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": m.vocab_size,
            "n_positions": m.seq_len,
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.ffn,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.eps,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout,
            "initializer_range": m.init_std,
            "scale_attn_weights": True,
            "use_cache": True,
            "tie_word_embeddings": m.tie_embeddings,
            "torch_dtype": "float32",
            **tokens,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters: write both.
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": m.dropout,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": True,
        "torch_dtype": "float32",
        **tokens,
    }


def model_fields_from_hf(hf_cfg: dict, *, path: str) -> dict:
    """The ``model`` config keys a transformers config.json implies (for checking a config against it)."""
    kind = hf_cfg.get("model_type")
    if kind == "gpt2":
        act = hf_cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{path}: activation_function {act!r} is not the tanh GELU Trident's gpt2 uses")
        return {
            "arch": "gpt2",
            "n_layers": hf_cfg["n_layer"],
            "d_model": hf_cfg["n_embd"],
            "n_heads": hf_cfg["n_head"],
            "ffn": hf_cfg.get("n_inner") or 4 * hf_cfg["n_embd"],
            "vocab_size": hf_cfg["vocab_size"],
            "eps": hf_cfg.get("layer_norm_epsilon", 1e-5),
            "max_seq_len": hf_cfg.get("n_positions", 1024),
            "tie_embeddings": hf_cfg.get("tie_word_embeddings", True),
        }
    if kind == "llama":
        rope = hf_cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or hf_cfg.get("rope_scaling"):
            raise ConfigError(f"{path}: rope scaling is not supported (only rope_type 'default')")
        if hf_cfg.get("attention_bias") or hf_cfg.get("mlp_bias"):
            raise ConfigError(f"{path}: attention_bias/mlp_bias are not supported by Trident's llama")
        heads = hf_cfg["num_attention_heads"]
        if hf_cfg.get("head_dim") not in (None, hf_cfg["hidden_size"] // heads):
            raise ConfigError(f"{path}: head_dim {hf_cfg['head_dim']} != hidden_size / num_attention_heads")
        return {
            "arch": "llama",
            "n_layers": hf_cfg["num_hidden_layers"],
            "d_model": hf_cfg["hidden_size"],
            "n_heads": heads,
            "kv_heads": hf_cfg.get("num_key_value_heads") or heads,
            "ffn": hf_cfg["intermediate_size"],
            "vocab_size": hf_cfg["vocab_size"],
            "eps": hf_cfg.get("rms_norm_eps", 1e-6),
            "rope_theta": float(theta),
            "max_seq_len": hf_cfg.get("max_position_embeddings", 2048),
            "tie_embeddings": hf_cfg.get("tie_word_embeddings", False),
        }
    raise ConfigError(f"{path}: model_type {kind!r} is not supported", hint="GPT-2 (gpt2) or Llama (llama)")
