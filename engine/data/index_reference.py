"""numpy reference implementations of the C++ index math in ``csrc/index.cpp``.

They define the results (tests assert C++ == numpy on random inputs) and are the fallback when the
extension is not built. Same conventions as the C++ side; see its header comment.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MASK64 = (1 << 64) - 1


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix64_int(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """A 64-bit RNG key from integers (seed, tags...), pure Python so it is the same everywhere."""
    key = 0x243F6A8885A308D3
    for part in parts:
        key = _mix64_int((key ^ (int(part) & MASK64)) + 0x9E3779B97F4A7C15)
    return key


def shuffle_reference(arr: np.ndarray, key: int) -> None:
    """In-place Fisher-Yates; draw ``i`` is ``mix64(key + i * golden) % (i + 1)`` for ``i = n-1 .. 1``."""
    n = arr.shape[0]
    if n < 2:
        return
    i = np.arange(n - 1, 0, -1, dtype=np.uint64)
    j = (mix64(np.uint64(key) + i * GOLDEN) % (i + np.uint64(1))).astype(np.int64)
    values = arr.tolist()  # swaps on a list are ~10x faster than on numpy scalars
    for a, b in zip(range(n - 1, 0, -1), j.tolist()):
        values[a], values[b] = values[b], values[a]
    arr[:] = values


def build_sample_idx_reference(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """Rows ``(position in doc_idx, offset)`` of stream tokens ``0, L, 2L, ...`` (row 0 is ``(0, 0)``)."""
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx)]
    ends = np.cumsum(lengths)  # ends[p] = stream position just past document p
    total = int(ends[-1]) if ends.size else 0
    targets = np.arange(1, num_samples + 1, dtype=np.int64) * seq_len
    if num_samples and int(targets[-1]) >= total:
        raise RuntimeError("build_sample_idx: documents hold fewer tokens than num_samples needs")
    # The document holding token t is the first p with ends[p] > t (empty documents are skipped).
    pos = np.searchsorted(ends, targets, side="right")
    out = np.zeros((num_samples + 1, 2), dtype=np.asarray(doc_idx).dtype)
    out[1:, 0] = pos
    out[1:, 1] = targets - (ends[pos] - lengths[pos])
    return out


def build_blend_idx_reference(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge datasets by virtual time ``(k + 0.5) / w[d]`` of their k-th sample, ties to the lowest d."""
    w = np.asarray(weights, dtype=np.float64)
    cap = np.minimum(np.floor(num_samples * w).astype(np.int64) + 2, num_samples)
    while True:
        times, owners, ks = [], [], []
        for d, wd in enumerate(w):
            if wd <= 0 or cap[d] == 0:
                continue
            k = np.arange(cap[d], dtype=np.int64)
            times.append((k.astype(np.float64) + 0.5) / wd)
            owners.append(np.full(cap[d], d, dtype=np.int16))
            ks.append(k)
        t, o, k = np.concatenate(times), np.concatenate(owners), np.concatenate(ks)
        order = np.lexsort((o, t))[:num_samples]
        used = np.bincount(o[order], minlength=w.size)
        # If some dataset used up all its candidates, the merge may be missing later ones: widen.
        if np.all((used < cap) | (cap >= num_samples)):
            return o[order].copy(), k[order].copy()
        cap = np.minimum(cap * 2 + 2, num_samples)
