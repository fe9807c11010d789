"""Export a checkpoint to Hugging Face (``python -m engine.export``).

Writes a transformers-loadable model (GPT2LMHeadModel for arch gpt2, LlamaForCausalLM for arch llama):
``model.safetensors``, ``config.json``, the SentencePiece tokenizer (``tokenizer.model`` with its
``tokenizer_config.json``) and ``trident_config.json`` (the run's config, for provenance). ``--checkpoint``
is a step directory or a save_dir (its newest complete checkpoint); any layout (TP, PP, ZeRO) is gathered.
"""

from __future__ import annotations

import json
import os
import shutil

from engine.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")


def find_tokenizer(raw: dict, explicit: str | None) -> str | None:
    """--tokenizer, else data.tokenizer, else the model prepare copied beside the first dataset."""
    from engine.data.shards import TOKENIZER_SUFFIX

    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"--tokenizer: {explicit} not found")
        return explicit
    data = raw.get("data", {})
    candidates = [data.get("tokenizer")] + [d["prefix"] + TOKENIZER_SUFFIX for d in data.get("datasets", [])[:1]]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def write_tokenizer(model_path: str, out: str) -> dict:
    """Copy the SentencePiece model and describe it for AutoTokenizer; returns the special token ids."""
    from engine.data.tokenizer import Tokenizer

    tok = Tokenizer.load(model_path)
    shutil.copyfile(model_path, os.path.join(out, "tokenizer.model"))
    sp = tok._sp  # the SentencePieceProcessor: pieces of the special ids
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v >= 0}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": 1 << 30,
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        **special,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump(special, fh, indent=2)
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def export(checkpoint: str, out: str, *, dtype: str = "fp32", tokenizer: str | None = None) -> dict:
    """Write the transformers model directory; returns its config.json content."""
    import torch
    from safetensors.torch import save_file

    from engine.checkpoint.gather import gather_full_state, model_config
    from engine.hf.mapping import check_exportable, hf_config, to_hf

    full, raw = gather_full_state(checkpoint)
    m = model_config(raw)
    check_exportable(m)
    os.makedirs(out, exist_ok=True)
    tok_path = find_tokenizer(raw, tokenizer)
    ids = write_tokenizer(tok_path, out) if tok_path else {}
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tensors = to_hf(m, full)
    if m.tie_embeddings:
        tensors.pop("lm_head.weight")  # transformers re-ties it on load; safetensors refuses shared storage
    save_file(
        {k: v.to(torch_dtype).clone() for k, v in tensors.items()},
        os.path.join(out, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = hf_config(m, bos_id=ids.get("bos"), eos_id=ids.get("eos"), pad_id=ids.get("pad"))
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(out, "trident_config.json"), "w", encoding="utf-8") as fh:
        json.dump(raw, fh, indent=1)
    return config
