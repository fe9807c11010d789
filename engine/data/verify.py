"""Full verification of a shard set (``python -m engine.prepare --verify PREFIX...``).

Checks, in order, stopping at the first problem with its file and byte offset (``DataError``):
metadata and tokenizer hash; per shard: ``.idx`` magic, version, dtype code and length; lengths
non-negative; pointers starting at 0 and advancing by ``length * itemsize``; document index starting at
0, non-decreasing and ending at the sequence count; ``.bin`` size == sum(lengths) x item size; every
token id in ``[0, vocab_size)``; shard counts equal to the metadata's.
"""

from __future__ import annotations

import os

import numpy as np

from engine.data.indexed import HEADER_BYTES, IndexHeader, bin_path
from engine.data.shards import read_meta, resolve_shards
from engine.data.tokenizer import file_sha256
from engine.errors import DataError

SCAN_TOKENS = 1 << 24  # tokens per chunk when scanning ids: bounded memory for any shard size


def _first_false(mask: np.ndarray) -> int | None:
    bad = np.flatnonzero(~mask)
    return int(bad[0]) if bad.size else None


def verify_shard(prefix: str, *, vocab_size: int | None) -> tuple[int, int]:
    """Check one ``.bin/.idx`` pair; returns (documents, tokens)."""
    idx_file = prefix + ".idx"
    header = IndexHeader.read(idx_file)
    n, item = header.num_sequences, header.dtype.itemsize
    raw = np.fromfile(idx_file, dtype=np.uint8)
    sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=HEADER_BYTES).astype(np.int64)
    ptr_off = HEADER_BYTES + 4 * n
    pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=ptr_off)
    doc_off = ptr_off + 8 * n
    doc_idx = np.frombuffer(raw, dtype="<i8", count=header.num_doc_idx, offset=doc_off)

    i = _first_false(sizes >= 0)
    if i is not None:
        raise DataError(f"{idx_file}: negative length {sizes[i]} of sequence {i} at byte {HEADER_BYTES + 4 * i}")
    expected_ptr = np.concatenate([[0], np.cumsum(sizes[:-1] * item)]) if n else sizes
    i = _first_false(pointers == expected_ptr)
    if i is not None:
        raise DataError(
            f"{idx_file}: pointer of sequence {i} is {pointers[i]}, expected {expected_ptr[i]} "
            f"at byte {ptr_off + 8 * i}",
            hint="pointers must start at 0 and advance by length x item size",
        )
    if header.num_doc_idx == 0 or doc_idx[0] != 0:
        raise DataError(f"{idx_file}: document index must start with 0 at byte {doc_off}")
    i = _first_false(np.diff(doc_idx) >= 0)
    if i is not None:
        raise DataError(f"{idx_file}: document index decreases at entry {i + 1}, byte {doc_off + 8 * (i + 1)}")
    if doc_idx[-1] != n:
        raise DataError(
            f"{idx_file}: document index ends at {doc_idx[-1]}, not the sequence count {n}, "
            f"at byte {doc_off + 8 * (header.num_doc_idx - 1)}"
        )
    tokens = int(sizes.sum())
    data_file = bin_path(prefix)
    actual = os.path.getsize(data_file) if os.path.exists(data_file) else None
    if actual is None:
        raise DataError(f"{data_file}: missing beside {idx_file}")
    if actual != tokens * item:
        raise DataError(
            f"{data_file}: {actual} bytes but the index sums to {tokens} tokens x {item} "
            f"= {tokens * item} bytes; "
            f"first mismatch at byte {min(actual, tokens * item)}",
            hint="truncated or overwritten .bin; re-run engine.prepare",
        )
    if vocab_size is not None and tokens:
        data = np.memmap(data_file, dtype=header.dtype, mode="r")
        for start in range(0, tokens, SCAN_TOKENS):
            chunk = np.asarray(data[start : start + SCAN_TOKENS])
            i = _first_false((chunk >= 0) & (chunk < vocab_size))
            if i is not None:
                at = start + i
                raise DataError(
                    f"{data_file}: token id {chunk[i]} >= vocab size {vocab_size} (or negative) at byte {at * item}",
                    hint="the shard was made with another tokenizer, or is corrupt",
                )
    return n, tokens


def verify_prefix(prefix: str, *, vocab_size: int | None = None) -> dict:
    """Verify a dataset prefix (one shard or a shard set); returns counts. Raises DataError on a problem."""
    meta = read_meta(prefix)
    shards = resolve_shards(prefix)
    if meta is not None:
        tok = os.path.join(os.path.dirname(prefix), str(meta.get("tokenizer", "")))
        if not os.path.isfile(tok):
            raise DataError(f"{tok}: tokenizer named in {prefix}.meta.json is missing")
        if file_sha256(tok) != meta.get("tokenizer_sha256"):
            raise DataError(
                f"{tok}: sha256 differs from the one in {prefix}.meta.json",
                hint="the tokenizer beside the shards was replaced",
            )
        if vocab_size is None and isinstance(meta.get("vocab_size"), int):
            vocab_size = meta["vocab_size"]
        listed = [s.get("prefix") for s in meta.get("shards", [])]
        if listed and listed != [os.path.basename(s) for s in shards]:
            raise DataError(f"{prefix}.meta.json: lists shards {listed}, found {[os.path.basename(s) for s in shards]}")
    documents = tokens = 0
    for n, shard in enumerate(shards):
        docs, toks = verify_shard(shard, vocab_size=vocab_size)
        if meta is not None and n < len(meta.get("shards", [])):
            want = meta["shards"][n]
            if (want.get("documents"), want.get("tokens")) != (docs, toks):
                raise DataError(
                    f"{shard}.idx: {docs} documents / {toks} tokens, but {prefix}.meta.json records "
                    f"{want.get('documents')} / {want.get('tokens')}"
                )
        documents += docs
        tokens += toks
    return {
        "prefix": prefix,
        "shards": len(shards),
        "documents": documents,
        "tokens": tokens,
        "vocab_size": vocab_size,
    }
