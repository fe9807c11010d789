"""Random-access sample datasets: packed GPT samples, weighted blends, and synthetic tokens.

Every dataset maps a global sample id ``i`` to an int64 array of ``seq_len + 1`` tokens (inputs are
``[:-1]``, targets ``[1:]``). ``get_batch(ids)`` fills a ``(len(ids), seq_len + 1)`` array in one call,
reading only the pages it needs from the memory-mapped shards.
"""

from __future__ import annotations

import bisect

import numpy as np

from engine.data.sample_index import (
    SampleIndex,
    build_blend_idx,
    compute_sample_index,
    derive_key,
    index_cache_key,
    load_or_build,
    normalize_weights,
    shuffle_inplace,
)
from engine.data.shards import ShardSet
from engine.errors import DataError

SPLIT_TRAIN, SPLIT_VALID = 0, 1
_VALID_SPLIT_SALT = 0x5A11D


class SampleDataset:
    """Base class: ``len()``, ``ds[i]`` and ``get_batch(ids)``; ``seq_len`` is tokens per sample minus one."""

    seq_len: int

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get_batch(np.array([i], dtype=np.int64))[0]

    def get_batch(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(np.asarray(ids).tolist()):
            self._fill(int(i), out[row])
        return out

    def _fill(self, i: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _check(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        return i % n


Dataset = SampleDataset


def split_documents(num_docs: int, valid_fraction: float, *, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train doc ids, valid doc ids), both sorted; a seeded ``valid_fraction`` of documents is held out.

    At least one document goes to each side when ``valid_fraction > 0``.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"data.valid_fraction: {valid_fraction} is not in [0, 1)")
    ids = np.arange(num_docs, dtype=np.int64)
    if valid_fraction == 0.0:
        return ids, ids[:0]
    if num_docs < 2:
        raise DataError(
            f"{name}: {num_docs} document(s) cannot be split into train and validation",
            hint="set data.valid_fraction to 0 or give validation prefixes",
        )
    k = min(max(1, round(num_docs * valid_fraction)), num_docs - 1)
    perm = ids.copy()
    shuffle_inplace(perm, derive_key(seed, _VALID_SPLIT_SALT))
    return np.sort(perm[k:]), np.sort(perm[:k])


class GPTDataset(SampleDataset):
    """Packed, globally shuffled samples over the documents ``doc_ids`` of one shard set."""

    def __init__(
        self,
        shards: ShardSet,
        doc_ids: np.ndarray,
        *,
        seq_len: int,
        seed: int,
        num_samples: int,
        split: int = SPLIT_TRAIN,
        cache_dir: str | None = None,
        build_index: bool = True,
    ) -> None:
        self.shards = shards
        self.seq_len = seq_len
        name = f"{shards.prefix}[{'train' if split == SPLIT_TRAIN else 'valid'}]"
        description = {
            "kind": "gpt",
            "seq_len": seq_len,
            "seed": seed,
            "num_samples": num_samples,
            "split": split,
        }
        key = index_cache_key(description, [shards.sizes, np.asarray(doc_ids, dtype=np.int64)])
        names = ("doc_idx", "sample_idx", "shuffle_idx")

        def build() -> dict[str, np.ndarray]:
            index = compute_sample_index(
                shards.sizes,
                doc_ids,
                seq_len=seq_len,
                seed=seed,
                num_samples=num_samples,
                split_tag=split,
                name=name,
            )
            return {n: getattr(index, n) for n in names}

        stem = "gpt-" + _safe_name(shards.prefix)
        arrays = load_or_build(cache_dir, stem, key, names, build, build=build_index)
        self.index = SampleIndex(**arrays)
        # Per-shard token arrays and the start token of each shard's documents, for direct slicing.
        self._bins = [s.tokens for s in shards.shards]
        self._starts = [np.asarray(s.pointers) // s.dtype.itemsize for s in shards.shards]
        self._offsets = shards.doc_offsets.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def _fill(self, i: int, out: np.ndarray) -> None:
        j = int(self.index.shuffle_idx[self._check(i)])
        pos, offset = (int(v) for v in self.index.sample_idx[j])
        doc_idx, sizes = self.index.doc_idx, self.shards.sizes
        filled, need = 0, self.seq_len + 1
        single = len(self._bins) == 1
        while filled < need:
            g = int(doc_idx[pos])
            take = min(int(sizes[g]) - offset, need - filled)
            if take > 0:
                s = 0 if single else bisect.bisect_right(self._offsets, g) - 1
                start = int(self._starts[s][g - self._offsets[s]]) + offset
                out[filled : filled + take] = self._bins[s][start : start + take]
                filled += take
            pos += 1
            offset = 0


class BlendedDataset(SampleDataset):
    """Datasets interleaved by weight: slot i is sample ``sample_index[i]`` of ``dataset_index[i]``."""

    def __init__(self, datasets: list[SampleDataset], dataset_index: np.ndarray, sample_index: np.ndarray) -> None:
        self.datasets = datasets
        self.seq_len = datasets[0].seq_len
        self.dataset_index = dataset_index
        self.sample_index = sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def _fill(self, i: int, out: np.ndarray) -> None:
        i = self._check(i)
        self.datasets[int(self.dataset_index[i])]._fill(int(self.sample_index[i]), out)


class SyntheticDataset(SampleDataset):
    """Random tokens; sample i depends only on (seed, i), for benchmarks and ``data.synthetic``."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, *, num_samples: int = 2**62) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def _fill(self, i: int, out: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, self._check(i)])
        out[:] = rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)


def _safe_name(prefix: str) -> str:
    base = prefix.rstrip("/").split("/")[-1] or "data"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]


def build_blended(
    parts: list[tuple[ShardSet, np.ndarray]],
    weights: np.ndarray,
    *,
    seq_len: int,
    seed: int,
    num_samples: int,
    split: int,
    cache_dir: str | None,
    build_index: bool,
) -> SampleDataset:
    """One dataset per (shards, doc ids); blended by ``weights`` when there are several."""
    num_samples = max(1, num_samples)
    if len(parts) == 1:
        shards, ids = parts[0]
        return GPTDataset(
            shards,
            ids,
            seq_len=seq_len,
            seed=seed,
            num_samples=num_samples,
            split=split,
            cache_dir=cache_dir,
            build_index=build_index,
        )
    w = normalize_weights(weights)
    description = {"kind": "blend", "weights": w.tolist(), "num_samples": num_samples}
    blend = load_or_build(
        cache_dir,
        "blend",
        index_cache_key(description, []),
        ("dataset_index", "sample_index"),
        lambda: dict(zip(("dataset_index", "sample_index"), build_blend_idx(w, num_samples))),
        build=build_index,
    )
    counts = np.bincount(np.asarray(blend["dataset_index"]), minlength=len(parts))
    datasets = [
        GPTDataset(
            shards,
            ids,
            seq_len=seq_len,
            seed=seed,
            num_samples=max(1, int(n)),
            split=split,
            cache_dir=cache_dir,
            build_index=build_index,
        )
        for (shards, ids), n in zip(parts, counts)
    ]
    return BlendedDataset(datasets, blend["dataset_index"], blend["sample_index"])


def build_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    *,
    seq_len: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int,
    valid_fraction: float,
    valid_prefixes: list[str] | None = None,
    cache_dir: str | None = None,
    vocab_size: int | None = None,
    tokenizer_sha256: str | None = None,
    build_index: bool = True,
    valid_weights: list[float] | None = None,
) -> tuple[SampleDataset, SampleDataset | None]:
    """(train, valid) datasets; valid is None when nothing is held out or ``num_valid_samples == 0``.

    ``valid_fraction`` of each dataset's documents are held out (seeded) unless ``valid_prefixes`` are
    given, which are then used whole (blended by ``valid_weights``, equal by default). Shards are opened
    with cheap checks; tokenizer hash and vocabulary are checked against the shard metadata. In a
    multi-rank run pass ``build_index=(rank == 0)``, barrier, then call again on the other ranks.
    """
    if not prefixes:
        raise DataError("data.datasets: no dataset prefixes given", hint='add {"prefix": "data/P"} entries')
    if seq_len < 1:
        raise DataError(f"model.seq_len: {seq_len} must be >= 1")
    weights = [1.0] * len(prefixes) if weights is None else list(weights)
    if len(weights) != len(prefixes):
        raise DataError(f"data.datasets: {len(weights)} weights for {len(prefixes)} prefixes")
    w = normalize_weights(weights)

    def open_checked(prefix: str) -> ShardSet:
        shards = ShardSet(prefix)
        shards.check_tokenizer(tokenizer_sha256, vocab_size)
        return shards

    train_sets = [open_checked(p) for p in prefixes]
    train_parts, valid_parts = [], []
    for shards in train_sets:
        split_vf = 0.0 if valid_prefixes else valid_fraction
        train_ids, valid_ids = split_documents(len(shards), split_vf, seed=seed, name=shards.prefix)
        train_parts.append((shards, train_ids))
        valid_parts.append((shards, valid_ids))
    common = {"seq_len": seq_len, "seed": seed, "cache_dir": cache_dir, "build_index": build_index}
    train = build_blended(train_parts, w, num_samples=num_train_samples, split=SPLIT_TRAIN, **common)
    if num_valid_samples <= 0:
        return train, None
    if valid_prefixes:
        vw = normalize_weights(valid_weights or [1.0] * len(valid_prefixes), what="data.valid_datasets[].weight")
        if len(vw) != len(valid_prefixes):
            raise DataError(f"data.valid_datasets: {len(vw)} weights for {len(valid_prefixes)} prefixes")
        parts = [(s, np.arange(len(s), dtype=np.int64)) for s in map(open_checked, valid_prefixes)]
        return train, build_blended(parts, vw, num_samples=num_valid_samples, split=SPLIT_VALID, **common)
    if valid_fraction == 0.0:
        return train, None
    return train, build_blended(valid_parts, w, num_samples=num_valid_samples, split=SPLIT_VALID, **common)
