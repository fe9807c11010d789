"""Sample order of a dataset: packing, global shuffle, blending, and their on-disk cache.

For one dataset (all its shards, the documents of one split) with seq_len ``L`` and seed ``s``:

1. ``doc_idx``: epoch ``e`` lists the split's documents in a shuffled order (key ``(s, split, e)``);
   epochs are concatenated, as many as the requested samples need. Every epoch is reshuffled.
2. ``sample_idx`` (C++): the concatenated token stream is cut into samples of ``L + 1`` tokens that
   start every ``L`` tokens (consecutive samples share one token); the final partial sample is dropped.
3. ``shuffle_idx``: the samples starting in epoch ``e`` are permuted among themselves (key ``(s, split,
   e)``), so the order is one global shuffle across all shards and documents, and an epoch finishes
   before the next begins.

Sample ``i`` of the dataset is packed sample ``shuffle_idx[i]``. Blending of several datasets is
:func:`build_blend_idx`. All index arrays can be cached under ``cache_dir`` in a folder named by a
sha256 of every input (document sizes, split, seq_len, seed, sample count), written once to a temporary
folder and renamed, then memory-mapped by every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from engine.data import index_reference as ref
from engine.errors import DataError

try:  # built by setup.py; the numpy references stand in when it is missing
    from engine.data import _index_cpp
except ImportError:  # pragma: no cover - exercised only without the extension
    _index_cpp = None

INDEX_FORMAT_VERSION = 1
INT32_MAX = np.iinfo(np.int32).max

derive_key = ref.derive_key


def have_cpp() -> bool:
    return _index_cpp is not None


def shuffle_inplace(arr: np.ndarray, key: int, *, use_cpp: bool = True) -> None:
    """Permute a 1-D int32/int64 array in place; the permutation depends only on (len, key)."""
    if use_cpp and _index_cpp is not None and arr.dtype in (np.int32, np.int64) and arr.flags.c_contiguous:
        (_index_cpp.shuffle_int32 if arr.dtype == np.int32 else _index_cpp.shuffle_int64)(arr, key)
    else:
        ref.shuffle_reference(arr, key)


def build_sample_idx(
    sizes: np.ndarray,
    doc_idx: np.ndarray,
    seq_len: int,
    num_samples: int,
    *,
    use_cpp: bool = True,
    num_threads: int = 0,
) -> np.ndarray:
    """(num_samples + 1, 2) rows (doc_idx position, offset) of stream tokens 0, L, 2L, ...."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    if use_cpp and _index_cpp is not None:
        fn = _index_cpp.build_sample_idx_int32 if doc_idx.dtype == np.int32 else _index_cpp.build_sample_idx_int64
        doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int32 if doc_idx.dtype == np.int32 else np.int64)
        return fn(sizes, doc_idx, seq_len, num_samples, num_threads)
    return ref.build_sample_idx_reference(sizes, doc_idx, seq_len, num_samples)


def normalize_weights(weights: list[float] | np.ndarray, *, what: str = "data.datasets[].weight") -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"{what}: weights must be finite, >= 0 and not all 0 (got {list(map(float, w.ravel()))})")
    return w / w.sum()


def build_blend_idx(weights, num_samples: int, *, use_cpp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``num_samples`` samples: (dataset id int16, sample id within that dataset int64) per slot.

    Weights are normalised first; dataset d's count after any prefix of n slots is within 1 of n * w[d].
    """
    w = normalize_weights(weights)
    if use_cpp and _index_cpp is not None:
        return _index_cpp.build_blend_idx(w, int(num_samples))
    return ref.build_blend_idx_reference(w, int(num_samples))


@dataclass(frozen=True)
class SampleIndex:
    """The three arrays of one dataset split; arrays may be memory-mapped from the cache."""

    doc_idx: np.ndarray  # (epochs * n_docs,) global document ids of the dataset
    sample_idx: np.ndarray  # (num_packed + 1, 2) rows (doc_idx position, offset)
    shuffle_idx: np.ndarray  # (num_packed,) packed sample id of dataset sample i

    def __len__(self) -> int:
        return int(self.shuffle_idx.shape[0])


def _epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    # Packed samples over E epochs: (E * T - 1) // L. Smallest E giving at least num_samples (and >= 1).
    need_tokens = max(num_samples, 1) * seq_len + 1
    return max(1, -(-need_tokens // tokens_per_epoch))


def compute_sample_index(
    sizes: np.ndarray,
    doc_ids: np.ndarray,
    *,
    seq_len: int,
    seed: int,
    num_samples: int,
    split_tag: int = 0,
    use_cpp: bool = True,
    name: str = "dataset",
) -> SampleIndex:
    """Index of the documents ``doc_ids`` (ids into ``sizes``) with at least ``num_samples`` samples."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    tokens = int(sizes[doc_ids].sum(dtype=np.int64))
    if tokens < seq_len + 1:
        raise DataError(
            f"{name}: {tokens} tokens in {doc_ids.size} documents, fewer than one sample of "
            f"seq_len + 1 = {seq_len + 1}",
            hint="use more data, a smaller seq_len or a smaller valid_fraction",
        )
    epochs = _epochs_needed(tokens, seq_len, num_samples)
    id_dtype = np.int32 if epochs * doc_ids.size <= INT32_MAX and sizes.size <= INT32_MAX else np.int64
    doc_idx = np.empty(epochs * doc_ids.size, dtype=id_dtype)
    for e in range(epochs):
        part = doc_ids.astype(id_dtype)
        shuffle_inplace(part, derive_key(seed, split_tag, 1, e), use_cpp=use_cpp)
        doc_idx[e * doc_ids.size : (e + 1) * doc_ids.size] = part
    num_packed = (epochs * tokens - 1) // seq_len
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, num_packed, use_cpp=use_cpp)
    # Samples starting in epoch e: tokens [e*T, (e+1)*T) -> ids [ceil(e*T/L), ceil((e+1)*T/L)).
    shuffle_idx = np.arange(num_packed, dtype=np.int64 if num_packed > INT32_MAX else np.int32)
    for e in range(epochs):
        lo = min(num_packed, -(-e * tokens // seq_len))
        hi = min(num_packed, -(-(e + 1) * tokens // seq_len))
        block = shuffle_idx[lo:hi]  # a view: shuffled in place
        shuffle_inplace(block, derive_key(seed, split_tag, 2, e), use_cpp=use_cpp)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx)


def index_cache_key(description: dict, arrays: list[np.ndarray]) -> str:
    """sha256 over a JSON description and the raw bytes of the input arrays (first 20 hex digits)."""
    digest = hashlib.sha256(json.dumps({"v": INDEX_FORMAT_VERSION, **description}, sort_keys=True).encode())
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()[:20]


def load_or_build(
    cache_dir: str | None, name: str, key: str, names: tuple[str, ...], build_fn, *, build: bool = True
) -> dict[str, np.ndarray]:
    """Arrays ``names`` from ``<cache_dir>/<name>-<key>/`` (memory-mapped), building them there if allowed.

    ``build=False`` (every rank but one in a multi-rank run) never writes: the index must already exist,
    built by the rank that called with ``build=True`` before a barrier.
    """
    if cache_dir is None:
        return build_fn()
    folder = os.path.join(cache_dir, f"{name}-{key}")
    if not os.path.isdir(folder):
        if not build:
            raise DataError(
                f"{folder}: sample index not found and this rank may not build it",
                hint="rank 0 builds indices (build_index=True) before a barrier; check cache_dir is shared",
            )
        arrays = build_fn()
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-{key}.", dir=cache_dir)
        try:
            for array_name in names:
                np.save(os.path.join(tmp, f"{array_name}.npy"), arrays[array_name])
            os.replace(tmp, folder)  # atomic: readers see a complete folder or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(folder):  # a concurrent builder won the rename: use its copy
                raise
    try:
        return {n: np.load(os.path.join(folder, f"{n}.npy"), mmap_mode="r") for n in names}
    except (OSError, ValueError) as err:
        raise DataError(f"{folder}: unreadable cached index ({err})", hint="delete the folder to rebuild it") from None
