"""A dataset prefix names one shard pair or a numbered shard set, plus Trident's metadata beside them.

Resolution of a prefix ``P`` (what ``data.datasets[].prefix`` and ``--verify`` accept):

* ``P.bin`` + ``P.idx`` exist: one shard (also how Megatron-LM's own files are read);
* otherwise ``P_00000.bin/.idx``, ``P_00001...`` (as ``engine.prepare --shard-tokens`` writes): the
  shard set, in numeric order; a gap in the numbering is an error.

``engine.prepare`` writes ``P.meta.json`` (tokenizer sha256, vocab size, special ids, dtype, shards,
counts) and copies the tokenizer to ``P.tokenizer.model``. Files without metadata (e.g. from
Megatron-LM's preprocessing) are accepted; only the tokenizer and vocab checks are then skipped.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from engine.data.indexed import IndexedDataset
from engine.errors import DataError

META_SUFFIX = ".meta.json"
TOKENIZER_SUFFIX = ".tokenizer.model"
SHARD_DIGITS = 5
META_FORMAT = "trident-shards/1"


def shard_prefix(prefix: str, number: int) -> str:
    return f"{prefix}_{number:0{SHARD_DIGITS}d}"


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def resolve_shards(prefix: str) -> list[str]:
    """Shard prefixes making up dataset ``prefix`` (see module docstring)."""
    if IndexedDataset.exists(prefix):
        return [prefix]
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"_(\d{" + str(SHARD_DIGITS) + r",})\.idx$")
    numbered = []
    for path in glob.glob(glob.escape(prefix) + "_*.idx"):
        m = pattern.match(os.path.basename(path))
        if m:
            numbered.append((int(m.group(1)), path[: -len(".idx")]))
    if not numbered:
        raise DataError(
            f"{prefix}: no shards found (looked for {prefix}.bin/.idx and {shard_prefix(prefix, 0)}.bin/.idx)",
            hint="pass the --output-prefix given to python -m engine.prepare",
        )
    numbered.sort()
    for expected, (number, _) in enumerate(numbered):
        if number != expected:
            raise DataError(
                f"{shard_prefix(prefix, expected)}.idx: shard missing from the set ({len(numbered)} shards found)",
                hint="copy the whole shard set",
            )
    return [path for _, path in numbered]


def read_meta(prefix: str) -> dict | None:
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: not Trident shard metadata (format != {META_FORMAT!r})")
    return meta


def write_meta(prefix: str, meta: dict) -> None:
    path = meta_path(prefix)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"format": META_FORMAT, **meta}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


class ShardSet:
    """All shards of one prefix opened (cheap checks only) as one document space.

    Global document ``g`` is document ``g - doc_offsets[s]`` of shard ``s``; ``sizes`` concatenates the
    shards' sizes (int32, one copy of 4 bytes per document).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.meta = read_meta(prefix)
        self.shards = [IndexedDataset(p) for p in resolve_shards(prefix)]
        dtypes = {s.dtype for s in self.shards}
        if len(dtypes) != 1:
            raise DataError(f"{prefix}: shards mix token dtypes {sorted(map(str, dtypes))}")
        self.dtype = self.shards[0].dtype
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(counts)])
        self.sizes = np.concatenate([s.sizes for s in self.shards]).astype(np.int32, copy=False)
        self.num_tokens = sum(s.num_tokens for s in self.shards)

    def __len__(self) -> int:
        return int(self.doc_offsets[-1])

    def check_tokenizer(self, tokenizer_sha256: str | None, vocab_size: int | None) -> None:
        """Refuse shards made with another tokenizer or holding ids beyond the model's vocabulary."""
        if self.meta is None:
            return
        if tokenizer_sha256 is not None and self.meta.get("tokenizer_sha256") != tokenizer_sha256:
            raise DataError(
                f"{self.prefix}: shards were made with tokenizer sha256 "
                f"{str(self.meta.get('tokenizer_sha256'))[:12]}..., "
                f"not the configured one {tokenizer_sha256[:12]}... ({meta_path(self.prefix)})",
                hint="re-run engine.prepare with this tokenizer, or use the tokenizer beside the shards",
            )
        shard_vocab = self.meta.get("vocab_size")
        if vocab_size is not None and isinstance(shard_vocab, int) and shard_vocab > vocab_size:
            raise DataError(
                f"{self.prefix}: tokenizer vocabulary of {shard_vocab} exceeds model.vocab_size {vocab_size} "
                f"({meta_path(self.prefix)})",
                hint=f"set model.vocab_size >= {shard_vocab}",
            )
