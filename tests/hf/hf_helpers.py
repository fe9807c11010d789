"""Tiny random transformers models built locally (no downloads) and Trident-side logits."""

from __future__ import annotations

import copy

import torch

from tests.helpers import BASE

GPT2_MODEL = {"arch": "gpt2", "n_layers": 2, "d_model": 32, "n_heads": 4, "seq_len": 16, "vocab_size": 97}
LLAMA_MODEL = {
    "arch": "llama",
    "n_layers": 3,
    "d_model": 32,
    "n_heads": 4,
    "n_kv_heads": 2,
    "seq_len": 16,
    "vocab_size": 97,
    "rope_theta": 500.0,
    "tie_embeddings": False,
    "ffn_hidden": 96,
}


def raw_config(tmp, model: dict, **train) -> dict:
    raw = copy.deepcopy(BASE)
    raw["model"] = dict(model)
    raw["train"] = {
        **raw["train"],
        "max_steps": 3,
        "device": "cpu",
        "log_dir": str(tmp / "run"),
        "save_dir": str(tmp / "ckpt"),
        **train,
    }
    return raw


def tokens(vocab: int, *, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))


def hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def save_random_hf(path: str, model: dict) -> None:
    """A randomly initialised transformers model matching a Trident ``model`` section, saved to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    if model["arch"] == "gpt2":
        cfg = GPT2Config(
            vocab_size=model["vocab_size"],
            n_positions=model["seq_len"],
            n_embd=model["d_model"],
            n_layer=model["n_layers"],
            n_head=model["n_heads"],
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        hf = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=model["vocab_size"],
            hidden_size=model["d_model"],
            intermediate_size=model["ffn_hidden"],
            num_hidden_layers=model["n_layers"],
            num_attention_heads=model["n_heads"],
            num_key_value_heads=model["n_kv_heads"],
            max_position_embeddings=model["seq_len"],
            rms_norm_eps=1e-6,
            rope_theta=model["rope_theta"],
            tie_word_embeddings=False,
        )
        hf = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases too, so a swapped or dropped tensor shows
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)


def trident_logits(model, ids: torch.Tensor, *, tp_group=None) -> torch.Tensor:
    """Full-vocabulary (B, S, V) fp32 logits of a Trident model, gathering TP vocabulary slices."""
    with torch.no_grad():
        model.eval()
        x = model.run_layers(model.embed_tokens(ids))
        local = model.logits(x)  # (S, B, V/tp)
        if tp_group is not None and tp_group.size > 1:
            from engine.distributed import collectives

            local = torch.cat(collectives.all_gather(local.contiguous(), tp_group), dim=-1)
        model.train()
        return local.transpose(0, 1)[..., : model.cfg.vocab_size].float()
