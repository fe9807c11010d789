"""Reshard on load: a checkpoint saved at one (dp, tp, pp, virtual stages, ZeRO stage) loads into any other.

Two halves meet in a layout-independent *logical* state: per parameter of the full model (global names:
``layers.<i>...`` with the global layer index, ``embed.weight`` unpadded, ...), the full fp32 master weight
and both Adam moments.

* Decode (``read_logical_state``): every old rank's optimizer state describes its flat buffers (names,
  shapes, offsets, TP split: ``FlatLayout.describe``, checkpoint format 2; format 1 is decoded from the
  saved model shapes and the TP split implied by the names, engine/checkpoint/gather.py's ``tp_layout``). A plain
  data-parallel buffer is read from DP rank 0; a ZeRO bucket is rebuilt by concatenating its DP shards in
  rank order. Pipeline-local names become global ones through the saved run's partition, the last stage's
  copy of a tied embedding is dropped (it equals the first stage's), TP shards are rejoined block by block
  and the vocabulary's TP padding rows are cut.
* Fill (``localize``): for each parameter this rank's optimizer holds, the logical tensors are padded to
  this run's vocabulary padding, cut to this TP rank's shard, checked against the expected shape (a
  checkpoint of another model is refused naming the tensor), and the optimizer writes its own flat
  buffers or ZeRO shards from them and republishes the compute-dtype parameters (``load_logical``).

Everything here is copying, never arithmetic, so the gathered states are bit-equal after the move. Every
rank reads every old shard (states are small next to the time of a restart; a rank needs the shards of
every old (tp, pp) position its parameters came from). Layout-independent parts (step, loss scaler,
loader position, resilience) come from old rank 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.checkpoint import store
from engine.errors import CheckpointError

KEYS = ("master", "exp_avg", "exp_avg_sq")
VOCAB_NAMES = ("embed.weight", "head.weight")
_LAYER = re.compile(r"^(?:(\d+)\.)?layers\.(\d+)\.(.+)$")
Logical = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SavedLayout:
    world: int
    dp: int
    tp: int
    pp: int
    virtual: int
    zero_stage: int
    model: object  # ModelConfig of the saved run


def layout_key(layout: dict) -> tuple:
    """What must be equal for the per-rank fast path (rank r reads shard r and nothing else)."""
    return (
        layout.get("world_size"),
        layout.get("dp"),
        layout.get("tp"),
        layout.get("pp"),
        layout.get("virtual_stages", 1),
        layout.get("zero_stage"),
    )


def saved_layout(manifest: dict, shard0: dict, path: str) -> SavedLayout:
    from engine.checkpoint.gather import model_config, saved_config

    raw = saved_config(shard0, path)
    par = raw.get("parallel", {})
    lay = manifest["layout"]
    return SavedLayout(
        world=int(manifest["world_size"]),
        dp=int(lay["dp"]),
        tp=int(par.get("tensor", 1)),
        pp=int(par.get("pipeline", 1)),
        virtual=int(par.get("virtual_stages", 1)),
        zero_stage=int(lay.get("zero_stage", raw.get("zero_optimization", {}).get("stage", 0))),
        model=model_config(raw),
    )


def stage_chunks(n_layers: int, *, pp: int, virtual: int, pp_rank: int):
    from engine.pipeline.partition import partition_layers
    from engine.pipeline.stage_model import PARTITION_METHOD

    return partition_layers(n_layers, stages=pp, virtual_stages=virtual, method=PARTITION_METHOD).chunks_of(pp_rank)


def global_name(name: str, chunks) -> tuple[str, bool]:
    """(name in the full model, whether it is the last stage's copy of the tied embedding). Local names
    read ``layers.<j>...`` or, with virtual stages, ``<local chunk>.layers.<j>...``."""
    m = _LAYER.match(name)
    if m is not None:
        chunk = chunks[int(m.group(1) or 0)]
        return f"layers.{chunk.start + int(m.group(2))}.{m.group(3)}", False
    head, _, rest = name.partition(".")
    chunk = chunks[0]
    if head.isdigit():
        chunk, name = chunks[int(head)], rest
    return name, name == "embed.weight" and not chunk.has_embedding


# ---------------------------------------------------------------------------------------------- decode


def _buffer_layout(buf: dict, model_state: dict, path: str) -> dict:
    """A flat buffer's layout: saved with it (format 2), or rebuilt from the model's shapes (format 1:
    names in buffer order, packed back to back from offset 0)."""
    if "layout" in buf:
        return buf["layout"]
    shapes, offsets, off = [], [], 0
    for name in buf["names"]:
        if name not in model_state:
            raise CheckpointError(f"{path}: optimizer state names {name}, which its model state lacks")
        shapes.append(tuple(model_state[name].shape))
        offsets.append(off)
        off += model_state[name].numel()
    return {"names": list(buf["names"]), "shapes": shapes, "offsets": offsets, "tp": None}


def _decode_position(shards: list[dict], path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Per-parameter fp32 tensors (this (tp, pp) position's local shapes) from the position's DP ranks
    (in DP rank order), and each name's TP split when the checkpoint recorded it."""
    opt = shards[0]["optimizer"]
    model_state = shards[0]["model"]
    if "groups" in opt:  # plain data parallelism: every DP rank holds the whole buffer
        buffers = [(g, {k: g[k] for k in KEYS}) for g in opt["groups"]]
    elif "buckets" in opt:  # ZeRO: a bucket is the concatenation of its DP shards
        buffers = [
            (b, {k: torch.cat([s["optimizer"]["buckets"][j][k] for s in shards]) for k in KEYS})
            for j, b in enumerate(opt["buckets"])
        ]
    else:
        raise CheckpointError(f"{path}: optimizer state of an unknown kind (keys {sorted(opt)})")
    out: dict[str, dict[str, torch.Tensor]] = {}
    tp_split: dict = {}
    for buf, flats in buffers:
        lay = _buffer_layout(buf, model_state, path)
        for i, (name, shape, off) in enumerate(zip(lay["names"], lay["shapes"], lay["offsets"])):
            n = int(torch.Size(shape).numel())
            out[name] = {k: flats[k][off : off + n].reshape(shape).clone() for k in KEYS}
            if lay.get("tp") is not None:
                tp_split[name] = lay["tp"][i]
    return out, tp_split


def read_logical_state(path: str) -> tuple[Logical, SavedLayout, dict]:
    """(logical state, the saved layout, old rank 0's shard) of checkpoint directory ``path``."""
    from engine.checkpoint.gather import tp_layout
    from engine.distributed.topology import Topology
    from engine.model.transformer import padded_vocab_size
    from engine.tensor_parallel.init import unshard_blocks

    manifest = store.read_manifest(path)
    shards = [store.load_shard(path, r) for r in range(int(manifest["world_size"]))]
    old = saved_layout(manifest, shards[0], path)
    topo = Topology(old.world, tp=old.tp, pp=old.pp)
    logical: Logical = {}
    for stage in range(old.pp):
        chunks = stage_chunks(old.model.n_layers, pp=old.pp, virtual=old.virtual, pp_rank=stage)
        per_tp = [
            _decode_position([shards[topo.rank(dp=d, pp=stage, tp=t)] for d in range(old.dp)], path)
            for t in range(old.tp)
        ]
        for name in per_tp[0][0]:
            gname, tied_copy = global_name(name, chunks)
            if tied_copy:
                continue
            split = per_tp[0][1].get(name, "infer")
            if split == "infer":
                split = tp_layout(gname, old.model, old.tp)
            entry = {}
            for k in KEYS:
                pieces = [per_tp[t][0][name][k] for t in range(old.tp)]
                full = (
                    pieces[0]
                    if split is None or old.tp == 1
                    else unshard_blocks(pieces, dim=split[0], sizes=tuple(split[1]))
                )
                if gname in VOCAB_NAMES:
                    if full.shape[0] != padded_vocab_size(old.model.vocab_size, old.tp):
                        raise CheckpointError(
                            f"{path}: tensor {gname} has {full.shape[0]} rows, not the padded vocabulary of its config"
                        )
                    full = full[: old.model.vocab_size]
                entry[k] = full.contiguous()
            logical[gname] = entry
    return logical, old, shards[0]


# ---------------------------------------------------------------------------------------------- fill


def _fit(full: torch.Tensor, gname: str, shape: tuple, split, *, tp_rank: int, tp_size: int, path: str) -> torch.Tensor:
    from engine.tensor_parallel.init import shard_blocks

    want = list(shape)
    if split is not None and tp_size > 1:
        want[split[0]] = sum(split[1])
    if gname in VOCAB_NAMES and full.dim() == 2 and full.shape[0] <= want[0] and full.shape[1:] == tuple(want[1:]):
        if want[0] - full.shape[0] >= max(tp_size, 1):  # more than this run's padding: another vocabulary
            raise CheckpointError(
                f"{path}: tensor {gname} has shape {tuple(full.shape)} in the checkpoint, "
                f"another vocabulary than this model's {tuple(want)} (padded)"
            )
        full = torch.cat([full, full.new_zeros(want[0] - full.shape[0], *full.shape[1:])])
    if tuple(full.shape) != tuple(want):
        raise CheckpointError(
            f"{path}: tensor {gname} has shape {tuple(full.shape)} in the checkpoint, {tuple(want)} in this model",
            hint="the checkpoint is of another model",
        )
    if split is None or tp_size == 1:
        return full
    return shard_blocks(full, dim=split[0], sizes=tuple(split[1]), rank=tp_rank, world=tp_size)


def localize(
    logical: Logical, layouts: list[dict], chunks, *, tp_rank: int, tp_size: int, path: str
) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's per-parameter tensors (local names and shapes) for the optimizer's ``load_logical``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for lay in layouts:
        for name, shape, split in zip(lay["names"], lay["shapes"], lay["tp"]):
            gname, _ = global_name(name, chunks)
            if gname not in logical:
                raise CheckpointError(
                    f"{path}: checkpoint does not fit this model (missing {gname})",
                    hint="the checkpoint is of another model",
                )
            out[name] = {
                k: _fit(logical[gname][k], gname, tuple(shape), split, tp_rank=tp_rank, tp_size=tp_size, path=path)
                for k in KEYS
            }
    return out


def check_unexpected(logical: Logical, model_cfg, *, path: str) -> None:
    """Refuse tensors this model has no place for (more layers, an untied head, ...), naming the first."""
    outer = (
        {"embed", "final_norm"}
        | ({"pos_embed"} if model_cfg.pos == "learned" else set())
        | (set() if model_cfg.tie_embeddings else {"head"})
    )
    for gname in sorted(logical):
        m = _LAYER.match(gname)
        extra_layer = m is not None and int(m.group(2)) >= model_cfg.n_layers
        if extra_layer or (m is None and gname.split(".")[0] not in outer):
            raise CheckpointError(
                f"{path}: checkpoint does not fit this model (unexpected {gname})",
                hint="the checkpoint is of another model",
            )


def load_resharded(path: str, *, cfg, ctx, optimizer) -> dict:
    """Fill ``optimizer`` (and through it the model) of this rank from checkpoint ``path`` saved with another
    layout; returns the layout-independent rest (old rank 0's shard, with the RNG state of the old rank
    nearest to this one's coordinates). Every rank of the run must call it (the optimizer republishes the
    parameters with DP collectives)."""
    from engine.distributed.topology import Topology

    logical, old, shard0 = read_logical_state(path)
    check_unexpected(logical, cfg.model, path=path)
    par = cfg.parallel
    chunks = stage_chunks(cfg.model.n_layers, pp=par.pipeline, virtual=par.virtual_stages, pp_rank=ctx.pp_rank)
    local = localize(logical, optimizer.param_layouts(), chunks, tp_rank=ctx.tp_rank, tp_size=par.tensor, path=path)
    optimizer.load_logical(local, applied_steps=int(shard0["optimizer"]["applied_steps"]))
    # Dropout streams belong to a layout (seeded per pipeline stage and TP rank); take the nearest old rank's.
    twin = Topology(old.world, tp=old.tp, pp=old.pp).rank(
        dp=min(ctx.dp_rank, old.dp - 1), pp=min(ctx.pp_rank, old.pp - 1), tp=min(ctx.tp_rank, old.tp - 1)
    )
    rest = dict(shard0)
    twin_shard = shard0 if twin == 0 else store.load_shard(path, twin)
    rest["rng"] = twin_shard["rng"]
    rest["tp_rng"] = twin_shard.get("tp_rng") if old.tp == par.tensor else None
    return rest
