"""Parallel tokenization of work units into Megatron shards, byte-identical for any worker count.

The parent streams work units (``text_sources``), keeps at most ``2 * workers + 2`` in flight, and
writes results strictly in submission order; workers parse, hash and encode. Profiled on 2 cores, the
parent costs about 0.05 s fixed plus 0.01 s of CPU per MB of JSONL (reading, routing bytes, writing
tokens), so the workers' encode is what scales; results come back as numpy buffers (pickled as raw
bytes), never as per-token Python objects. EOS follows every
document; whitespace-only documents are skipped; ``dedup`` drops exact repeats (blake2b-128 of the
UTF-8 text, first occurrence kept). Shards roll over after the document that reaches ``shard_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from engine.data.indexed import IndexedDatasetWriter, token_dtype_for_vocab
from engine.data.shards import TOKENIZER_SUFFIX, shard_prefix, write_meta
from engine.data.tokenizer import Tokenizer
from engine.errors import DataError


def documents_of_unit(unit: tuple, text_key: str) -> list[str]:
    """The document strings of one work unit (JSON parsed here, in the worker)."""
    if unit[0] == "texts":
        return unit[2]
    _, path, first_line, data = unit
    docs = []
    for n, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}:{first_line + n}: invalid JSON ({err})", hint="one JSON object per line") from None
        text = obj.get(text_key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{first_line + n}: no string field '{text_key}'", hint="pass --text-key")
        docs.append(text)
    return docs


@lru_cache(maxsize=2)  # per process: each worker loads the model once
def _processor(path: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(path)
    return sp


def encode_unit(job: tuple) -> tuple:
    """Worker: (flat tokens, lengths int64, blake2b digests or None, empty count) or ("error", message).

    SentencePiece returns one int32 buffer per document (``out_type="numpy"``, EOS appended in C++), so
    no Python int is created per token: lists of ints plus flattening them added about 30% to the
    encode itself (``python -m engine.bench data``: encode_as_ids vs encode -> numpy rows).
    """
    unit, tokenizer_path, text_key, dtype, dedup = job
    try:
        docs = documents_of_unit(unit, text_key)
    except DataError as err:
        return ("error", str(err))
    kept = [d for d in docs if d and not d.isspace()]  # == d.strip() != "" without copying each text
    if not kept:
        return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64), [] if dedup else None, len(docs)
    ids = _processor(tokenizer_path).Encode(kept, out_type="numpy", add_eos=True, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids).astype(dtype, copy=False)  # ids < vocab_size, which fits dtype
    digests = (
        [hashlib.blake2b(d.encode("utf-8", "surrogatepass"), digest_size=16).digest() for d in kept] if dedup else None
    )
    return flat, lengths, digests, len(docs) - len(kept)


@dataclass
class PrepareSummary:
    output_prefix: str
    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    duplicates_removed: int = 0
    tokens: int = 0
    shards: list[str] = field(default_factory=list)
    dtype: str = ""
    input_bytes: int = 0
    seconds: float = 0.0
    workers: int = 1
    tokenizer: str = ""
    tokenizer_sha256: str = ""

    def lines(self) -> list[str]:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        mbs = self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0
        return [
            f"prepared {self.output_prefix}: {self.documents:,} documents, {self.tokens:,} tokens "
            f"({self.dtype}) "
            f"in {len(self.shards)} shard(s) from {self.files} file(s)",
            f"  skipped {self.empty_skipped:,} empty, removed {self.duplicates_removed:,} duplicate documents",
            f"  {self.seconds:.2f} s with {self.workers} worker(s): {rate:,.0f} tokens/s, {mbs:.1f} MB/s",
            f"  tokenizer {self.tokenizer} (sha256 {self.tokenizer_sha256[:16]}...)",
        ]


class _ShardSink:
    """Writes documents into one prefix or numbered shards, rolling over at ``shard_tokens``."""

    def __init__(self, prefix: str, dtype: np.dtype, shard_tokens: int | None) -> None:
        self.prefix, self.dtype, self.shard_tokens = prefix, dtype, shard_tokens
        self.done: list[tuple[str, int, int]] = []  # (shard prefix, documents, tokens)
        self.writer: IndexedDatasetWriter | None = None

    def _open(self) -> IndexedDatasetWriter:
        if self.writer is None:
            name = self.prefix if self.shard_tokens is None else shard_prefix(self.prefix, len(self.done))
            self.writer = IndexedDatasetWriter(name, dtype=self.dtype)
        return self.writer

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.finalize()
            self.done.append((self.writer.prefix, len(self.writer), self.writer.num_tokens))
            self.writer = None

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        start_doc, start_tok = 0, 0
        while start_doc < lengths.size:
            writer = self._open()
            if self.shard_tokens is None:
                stop = lengths.size
            else:
                room = self.shard_tokens - writer.num_tokens  # > 0: full shards are closed right away
                stop = int(np.searchsorted(ends - start_tok, room, side="left")) + 1
                stop = min(max(stop, start_doc + 1), lengths.size)
            end_tok = int(ends[stop - 1])
            writer.add_documents(flat[start_tok:end_tok], lengths[start_doc:stop])
            start_doc, start_tok = stop, end_tok
            if self.shard_tokens is not None and writer.num_tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> list[tuple[str, int, int]]:
        if self.writer is not None or not self.done:
            self._open()
            self._close()
        return self.done

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class _NoBar:
    """Stands in for tqdm with ``--no-progress`` (importing tqdm alone costs ~50 ms of CPU)."""

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total_bytes: int | None):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", smoothing=0.1)


def _remove_stale_outputs(prefix: str, keep: set[str]) -> None:
    """Drop shards of an earlier run under this prefix that this run did not write."""
    import glob
    import re

    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"(_\d{5,})?\.(bin|idx)$")
    for path in glob.glob(glob.escape(prefix) + "*"):
        if pattern.match(os.path.basename(path)) and path.rsplit(".", 1)[0] not in keep:
            os.remove(path)


def run_prepare(
    units,
    *,
    output_prefix: str,
    tokenizer: Tokenizer,
    workers: int,
    shard_tokens: int | None = None,
    dedup: bool = False,
    text_key: str = "text",
    total_bytes: int | None = None,
    progress: bool = True,
    num_files: int = 0,
) -> PrepareSummary:
    """Tokenize ``units`` (``text_sources.iter_work_units``) into shards + metadata at ``output_prefix``."""
    if tokenizer.eos_id < 0:
        raise DataError(
            f"{tokenizer.path}: the tokenizer has no eos piece to end documents with",
            hint="train one with engine.prepare --train-tokenizer, or use a model that defines eos",
        )
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    summary = PrepareSummary(output_prefix, files=num_files, dtype=str(dtype), workers=workers)
    sink = _ShardSink(output_prefix, dtype, shard_tokens)
    seen: set[bytes] = set()
    start = time.perf_counter()
    bar = _progress_bar(total_bytes) if progress else _NoBar()
    jobs = (((unit, tokenizer.path, text_key, dtype, dedup), disk_bytes) for unit, disk_bytes in _track(units, summary))

    def consume(result: tuple, disk_bytes: int) -> None:
        if isinstance(result[0], str):  # ("error", message) from a worker
            raise DataError(result[1])
        flat, lengths, digests, empty = result
        summary.empty_skipped += empty
        if digests is not None:
            keep = np.ones(lengths.size, dtype=bool)
            for i, digest in enumerate(digests):
                if digest in seen:
                    keep[i] = False
                else:
                    seen.add(digest)
            if not keep.all():
                summary.duplicates_removed += int((~keep).sum())
                flat, lengths = flat[np.repeat(keep, lengths)], lengths[keep]
        sink.write(flat, lengths)
        summary.documents += int(lengths.size)
        summary.tokens += int(lengths.sum())
        bar.update(disk_bytes)
        bar.set_postfix(docs=f"{summary.documents:,}", tokens=f"{summary.tokens:,}", refresh=False)

    try:
        if workers <= 1:
            for job, disk_bytes in jobs:
                consume(encode_unit(job), disk_bytes)
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            if method == "fork":
                _processor(tokenizer.path)  # loaded once here, inherited by every forked worker
            with multiprocessing.get_context(method).Pool(workers) as pool:
                pending: deque = deque()
                for job, disk_bytes in jobs:
                    pending.append((pool.apply_async(encode_unit, (job,)), disk_bytes))
                    if len(pending) >= 2 * workers + 2:  # bounded read-ahead: never the whole corpus
                        result, nbytes = pending.popleft()
                        consume(result.get(), nbytes)
                while pending:
                    result, nbytes = pending.popleft()
                    consume(result.get(), nbytes)
        shards = sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    summary.shards = [p for p, _, _ in shards]
    _remove_stale_outputs(output_prefix, set(summary.shards))
    copy = output_prefix + TOKENIZER_SUFFIX
    if os.path.abspath(tokenizer.path) != os.path.abspath(copy):
        shutil.copyfile(tokenizer.path, copy + ".tmp")
        os.replace(copy + ".tmp", copy)
    summary.seconds = time.perf_counter() - start
    summary.tokenizer, summary.tokenizer_sha256 = copy, tokenizer.sha256
    write_meta(
        output_prefix,
        {
            "tokenizer": os.path.basename(copy),
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "dtype": str(dtype),
            "documents": summary.documents,
            "tokens": summary.tokens,
            "duplicates_removed": summary.duplicates_removed,
            "empty_skipped": summary.empty_skipped,
            "shards": [{"prefix": os.path.basename(p), "documents": d, "tokens": t} for p, d, t in shards],
        },
    )
    return summary


def _track(units, summary: PrepareSummary):
    for unit, disk_bytes in units:
        summary.input_bytes += disk_bytes
        yield unit, disk_bytes


def summary_json(summary: PrepareSummary) -> str:
    return json.dumps(asdict(summary), sort_keys=True)
