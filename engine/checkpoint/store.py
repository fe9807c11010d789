"""Atomic sharded checkpoints.

Layout under ``save_dir``::

    step_00000100/manifest.json      written last: step, format version, layout, per-shard SHA-256
    step_00000100/rank_00000.pt      one shard per rank: every component's state_dict()
    latest                           text file naming the newest complete step directory

A save writes into ``.tmp_step_00000100``; every rank writes and fsyncs its shard and a ``.sha256``
sidecar, all ranks meet at a barrier, then rank 0 writes the manifest (tmp + fsync + rename), renames the
directory into place, fsyncs ``save_dir`` and replaces ``latest`` by atomic rename. A crash at any point
leaves either the previous checkpoint or the new complete one. A directory without a manifest is never
loaded.

The save has three phases so that the middle one can run on a background thread (``train.async_save``,
engine/checkpoint/async_save.py): :func:`prepare_save` (all ranks, collective: rank 0 makes the empty tmp
directory), :func:`write_shard` (one rank's file I/O only, no collectives) and :func:`commit_save` (all ranks,
collective: barrier, rank 0 publishes, barrier). :func:`save_checkpoint` runs them back to back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable

import torch

from engine.errors import CheckpointError, NoCheckpointError

# 2: optimizer states describe their flat buffers (names, shapes, offsets, TP split, ZeRO shard range) and the
#    manifest's layout records virtual_stages, so a checkpoint reshards into any layout (reshard.py).
# 1: the same files without those descriptions; still read (decoded from the model shapes and names).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def save_checkpoint(
    save_dir: str,
    step: int,
    state: dict,
    *,
    rank: int,
    world_size: int,
    layout: dict,
    keep_last: int,
    barrier: Callable[[], None] = lambda: None,
) -> str:
    """Write this rank's ``state``; returns the final directory. All ranks must call it."""
    tmp = prepare_save(save_dir, step, rank=rank, barrier=barrier)
    write_shard(tmp, state, rank=rank)
    return commit_save(
        save_dir, step, rank=rank, world_size=world_size, layout=layout, keep_last=keep_last, barrier=barrier
    )


def prepare_save(save_dir: str, step: int, *, rank: int, barrier: Callable[[], None] = lambda: None) -> str:
    """Phase 1, all ranks: rank 0 makes an empty ``.tmp_step_XXXXXXXX`` (dropping a stale one), then every rank
    waits for it. Returns the tmp directory the shards go to."""
    tmp = os.path.join(save_dir, f".tmp_{step_dir_name(step)}")
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    return tmp


def write_shard(tmp: str, state: dict, *, rank: int) -> str:
    """Phase 2, one rank, any thread (file I/O only): ``rank_XXXXX.pt`` + fsync, then its ``.sha256``
    sidecar. An OS error (disk full, permissions) becomes a CheckpointError naming the file."""
    shard = os.path.join(tmp, f"rank_{rank:05d}.pt")
    target = shard
    try:
        with open(shard, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        target = shard + ".sha256"
        _write_atomic_text(target, _sha256(shard))
    except OSError as err:
        raise CheckpointError(
            f"{target}: writing the checkpoint failed ({err.strerror or err})",
            hint="check free space and permissions under train.save_dir",
        ) from err
    return shard


def commit_save(
    save_dir: str,
    step: int,
    *,
    rank: int,
    world_size: int,
    layout: dict,
    keep_last: int,
    barrier: Callable[[], None] = lambda: None,
) -> str:
    """Phase 3, all ranks, once every rank's :func:`write_shard` returned: barrier, rank 0 writes the manifest,
    renames the directory into place, points ``latest`` at it and prunes; barrier. Returns the directory."""
    name = step_dir_name(step)
    final = os.path.join(save_dir, name)
    tmp = os.path.join(save_dir, f".tmp_{name}")
    barrier()
    if rank == 0:
        shards = {}
        for r in range(world_size):
            fname = f"rank_{r:05d}.pt"
            with open(os.path.join(tmp, fname + ".sha256"), encoding="utf-8") as fh:
                shards[fname] = fh.read().strip()
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "layout": layout,
            "shards": shards,
        }
        _write_atomic_text(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True))
        if os.path.exists(final):  # a stale copy of the same step (e.g. after a rollback) is replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(save_dir)
        _write_atomic_text(os.path.join(save_dir, "latest"), name + "\n")
        _prune(save_dir, keep_last)
        _drop_stale_tmp(save_dir, before_step=step)
    barrier()
    return final


def _complete_steps(save_dir: str) -> list[int]:
    if not os.path.isdir(save_dir):
        return []
    steps = []
    for entry in os.listdir(save_dir):
        m = STEP_DIR.match(entry)
        if m and os.path.isfile(os.path.join(save_dir, entry, "manifest.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _prune(save_dir: str, keep_last: int) -> None:
    for step in _complete_steps(save_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, step_dir_name(step)), ignore_errors=True)


def _drop_stale_tmp(save_dir: str, *, before_step: int) -> None:
    """Remove the unfinished ``.tmp_step_*`` directories of earlier steps: saves a crash (or an abandoned
    background write) left behind. Nothing writes them any more: at most one save is in flight."""
    for entry in os.listdir(save_dir):
        m = STEP_DIR.match(entry[len(".tmp_") :]) if entry.startswith(".tmp_") else None
        if m and int(m.group(1)) < before_step:
            shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)


def has_checkpoint(save_dir: str | None) -> bool:
    return bool(save_dir) and bool(_complete_steps(save_dir))


def read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/manifest.json: unreadable ({err})") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}/manifest.json: format_version {manifest.get('format_version')} is not one "
            f"this Trident reads ({', '.join(map(str, READABLE_VERSIONS))})",
            hint="a newer Trident wrote it: load it with that version",
        )
    return manifest


def latest_checkpoint(
    save_dir: str, *, warn: Callable[[str], None] = lambda msg: None, before_step: int | None = None
) -> str:
    """Newest complete checkpoint directory whose shards verify (optionally saved before ``before_step``);
    falls back to older ones with a warning."""
    candidates = [s for s in _complete_steps(save_dir) if before_step is None or s < before_step]
    if not candidates:
        raise NoCheckpointError(
            f"{save_dir}: no complete checkpoint to resume from",
            hint="drop --resume / train.resume to start from scratch",
        )
    for step in reversed(candidates):
        path = os.path.join(save_dir, step_dir_name(step))
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    raise NoCheckpointError(f"{save_dir}: every checkpoint failed verification")


def verify_checkpoint(path: str) -> str | None:
    """None if every shard named in the manifest exists with its SHA-256, else the first problem."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as err:
        return str(err)
    for fname, digest in sorted(manifest["shards"].items()):
        shard = os.path.join(path, fname)
        if not os.path.isfile(shard):
            return f"{shard} is missing"
        if _sha256(shard) != digest:
            return f"{shard} fails its SHA-256 check (corrupt or truncated)"
    return None


def load_shard(path: str, rank: int) -> dict:
    shard = os.path.join(path, f"rank_{rank:05d}.pt")
    try:
        with open(shard, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{shard}: missing (checkpoint saved with another layout?)") from None
