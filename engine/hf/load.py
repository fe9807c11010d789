"""Start training from a local transformers GPT-2 / Llama checkpoint (``train.init_from_hf``).

The trainer calls :func:`init_from_hf` right after building the fp32 model and before the optimizer copies
master weights, so every layout (TP shards, pipeline chunks) simply overwrites its parameters with its
part of the converted full state. The config's ``model`` section must describe the same network; any
difference is refused by key before a tensor is touched.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from engine.config import ModelConfig, TridentConfig
from engine.errors import CheckpointError, ConfigError
from engine.hf.mapping import from_hf, model_fields_from_hf
from engine.tensor_parallel.init import shard_blocks
from engine.tensor_parallel.layers import group_rank, group_size

Tensors = dict[str, torch.Tensor]


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(
            f"train.init_from_hf: {cfg_path} not found",
            hint="point it at a directory written by save_pretrained or python -m engine.export",
        )
    with open(cfg_path, encoding="utf-8") as fh:
        return json.load(fh)


def check_matches(m: ModelConfig, hf_cfg: dict, *, path: str) -> None:
    """Refuse, naming the model key, any config that does not describe the checkpoint's network."""
    want = model_fields_from_hf(hf_cfg, path=os.path.join(path, "config.json"))
    have = {
        "arch": m.arch,
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "n_heads": m.n_heads,
        "kv_heads": m.kv_heads,
        "ffn": m.ffn,
        "vocab_size": m.vocab_size,
        "eps": m.eps,
        "rope_theta": m.rope_theta,
        "tie_embeddings": m.tie_embeddings,
    }
    keys = {"kv_heads": "n_kv_heads", "ffn": "ffn_hidden", "eps": "norm_eps"}
    for key, value in want.items():
        if key == "max_seq_len":
            if m.seq_len > value:
                raise ConfigError(f"model.seq_len: {m.seq_len} exceeds the checkpoint's {value} positions")
            continue
        if key == "rope_theta" and m.arch != "llama":
            continue
        mine = have[key]
        same = abs(mine - value) <= 1e-12 * max(1.0, abs(value)) if isinstance(value, float) else mine == value
        if not same:
            raise ConfigError(
                f"model.{keys.get(key, key)}: {json.dumps(mine)} but the Hugging Face checkpoint "
                f"{path} has {json.dumps(value)}",
                hint="make the model section match config.json",
            )


def read_hf_weights(path: str) -> Tensors:
    """model.safetensors, a sharded safetensors index, or pytorch_model.bin, as fp32 tensors."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.torch import load_file

        files = (
            [single]
            if os.path.isfile(single)
            else sorted(
                {os.path.join(path, f) for f in json.load(open(index, encoding="utf-8"))["weight_map"].values()}
            )
        )
        out: Tensors = {}
        for f in files:
            out.update(load_file(f))
    elif os.path.isfile(legacy):
        out = torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return {k: v.float() for k, v in out.items()}


def _local_part(param: nn.Parameter, full: torch.Tensor, group) -> torch.Tensor:
    """This TP rank's shard of ``full`` as the parameter is laid out (tp_dim / tp_sizes)."""
    dim = getattr(param, "tp_dim", None)
    if dim is None or group_size(group) == 1:
        return full
    sizes = param.tp_sizes
    if dim == 0 and len(sizes) == 1 and full.shape[0] < sizes[0]:  # vocabulary padded to a multiple of tp
        full = torch.cat((full, full.new_zeros(sizes[0] - full.shape[0], *full.shape[1:])))
    return shard_blocks(full, dim=dim, sizes=sizes, rank=group_rank(group), world=group_size(group))


def load_into(chunk: nn.Module, full: Tensors, *, path: str) -> None:
    """Copy each parameter of one model chunk (a ``Transformer``) from the full Trident state dict."""
    with torch.no_grad():
        for name, param in chunk.named_parameters():
            key = name
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                key = f"layers.{chunk.layer_ids[int(local)]}.{rest}"
            if key not in full:
                raise CheckpointError(f"{path}: no weights for {key}")
            value = _local_part(param, full[key], chunk.tp_group)
            if param.dim() and value.shape[0] != param.shape[0] and key in ("embed.weight", "head.weight"):
                value = torch.cat((value, value.new_zeros(param.shape[0] - value.shape[0], *value.shape[1:])))
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{path}: {key} converts to shape {tuple(value.shape)}, the model needs {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))


def init_from_hf(model: nn.Module, path: str, cfg: TridentConfig) -> None:
    """Overwrite ``model`` (a Transformer, or a ModuleList of pipeline chunks) with the checkpoint at ``path``."""
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from_hf: {path} is not a directory")
    check_matches(cfg.model, read_hf_config(path), path=path)
    full = from_hf(cfg.model, read_hf_weights(path))
    chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
    for chunk in chunks:
        load_into(chunk, full, path=path)
