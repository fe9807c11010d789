"""Helpers for the data tests: tiny generated corpora and shards."""

from __future__ import annotations

import json
import random

import numpy as np

from engine.data.indexed import IndexedDatasetWriter

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega def return class import yield async await lambda 0 1 2 3 42 3.14 (x) [y] {z}"
).split()


def make_docs(n: int, seed: int = 0, *, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words // 4))))
        docs.append("\n".join(lines) + rng.choice(["", "\n", "  é ü 漢 😀"]))
    return docs


def write_jsonl(path, docs, key: str = "text") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": 1}) + "\n")


def write_random_shards(prefix: str, sizes: list[int], *, seed: int = 0, vocab: int = 1000, dtype=np.uint16) -> list:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=s).astype(dtype) for s in sizes]
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for d in docs:
            w.add_document(d)
    return docs
