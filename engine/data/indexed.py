"""Megatron-LM's MMapIndexedDataset format: a ``.bin`` of raw tokens and an ``.idx`` describing it.

``.idx`` layout (all little-endian), byte for byte what Megatron-LM writes and reads::

    offset 0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9   uint64    version (1)
    offset 17  uint8     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
                         8 uint16)
    offset 18  uint64    S = sequence count
    offset 26  uint64    D = document-index count (documents + 1; starts with 0)
    offset 34  int32[S]  sequence lengths in tokens
               int64[S]  byte pointer of each sequence into .bin
               int64[D]  document index: sequence ids where documents end, ``[0, ...]``

Trident writes one sequence per document (so ``doc_idx == arange(S + 1)``) and treats every sequence
as a document when packing; files from Megatron-LM's preprocessing read the same way.

The writer streams tokens to ``<prefix>.bin.tmp`` and ``<prefix>.idx.tmp`` and renames both on
``finalize()`` (``.idx`` last), so a crash never leaves a half-written pair under the final names.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from engine.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # 9 magic + 8 version + 1 dtype + 8 S + 8 D

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32: Megatron's choice, half the disk."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin/.idx``; the final names appear only at ``finalize()``.

    Sizes and pointers are kept in memory (12 bytes per document) until ``finalize()``; tokens go to disk
    as they arrive.
    """

    def __init__(self, prefix: str | os.PathLike, *, dtype: np.dtype | type) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(
                f"{self.prefix}: dtype {self.dtype} has no MMIDIDX code",
                hint="use one of " + ", ".join(str(d) for d in DTYPE_CODES.values()),
            )
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = bin_path(self.prefix) + ".tmp"
        self._idx_tmp = idx_path(self.prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb")  # closed in finalize() / abort()
        self._sizes: list[int] = []
        self.num_tokens = 0
        self._done = False

    def __len__(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be 1-D, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes())
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: ``flat_tokens`` is their concatenation, ``lengths`` their sizes."""
        flat = np.ascontiguousarray(flat_tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(flat.tobytes())
        self._sizes.extend(lengths.tolist())
        self.num_tokens += int(flat.size)

    def finalize(self) -> None:
        """Flush, fsync and rename ``.bin`` then ``.idx`` into place."""
        if self._done:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int64)
        if sizes.size and int(sizes.max()) > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a document has {int(sizes.max())} tokens, more than int32 holds")
        pointers = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(sizes.size + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", sizes.size))
            f.write(struct.pack("<Q", doc_idx.size))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Drop the temporary files (used when preparation fails part way)."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _map_readonly(path: str) -> np.ndarray:
    """The file as a read-only uint8 array over mmap (plain ndarray: slicing is cheaper than np.memmap's)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return np.zeros(0, dtype=np.uint8)  # an empty file cannot be mapped
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


class IndexHeader:
    """The fixed-size part of an ``.idx``; ``read`` checks magic, version, dtype code and file length."""

    def __init__(self, path: str, dtype_code: int, num_sequences: int, num_doc_idx: int) -> None:
        self.path = path
        self.dtype_code = dtype_code
        self.dtype = DTYPE_CODES[dtype_code]
        self.num_sequences = num_sequences
        self.num_doc_idx = num_doc_idx

    @property
    def expected_length(self) -> int:
        return HEADER_BYTES + self.num_sequences * (4 + 8) + self.num_doc_idx * 8

    @classmethod
    def read(cls, path: str) -> IndexHeader:
        try:
            length = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as err:
            raise DataError(
                f"{path}: cannot read ({err.strerror})", hint="check the --output-prefix / data prefix"
            ) from None
        if head[:9] != MAGIC:
            raise DataError(
                f"{path}: bad magic at byte 0 (expected b'MMIDIDX\\x00\\x00', found {head[:9]!r})",
                hint="not a Megatron MMapIndexedDataset index",
            )
        if len(head) < HEADER_BYTES:
            raise DataError(f"{path}: truncated header at byte {len(head)} (need {HEADER_BYTES} bytes)")
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != VERSION:
            raise DataError(f"{path}: unsupported version {version} at byte 9 (expected {VERSION})")
        code = head[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown dtype code {code} at byte 17", hint="valid codes are 1-8")
        num_seq, num_doc = struct.unpack_from("<QQ", head, 18)
        header = cls(path, code, num_seq, num_doc)
        if length != header.expected_length:
            raise DataError(
                f"{path}: index is {length} bytes but its header (byte 18: {num_seq} sequences, "
                f"{num_doc} document entries) implies {header.expected_length}",
                hint="the file is truncated or corrupt; re-run engine.prepare",
            )
        return header


CHECK_CHUNK = 1 << 22  # index entries per vectorised check: bounded memory for any index size


def check_lengths_and_pointers(idx_file: str, sizes: np.ndarray, pointers: np.ndarray, itemsize: int) -> None:
    """Refuse a negative length or a pointer that is not the running sum of the lengths before it.

    Reading every document then stays inside the ``.bin`` once its size matches; O(n) like the token total,
    in chunks of ``CHECK_CHUNK`` entries (about 0.3 s per 10M documents on one CI core).
    """
    n, running = sizes.size, 0
    for lo in range(0, n, CHECK_CHUNK):
        chunk = sizes[lo : lo + CHECK_CHUNK].astype(np.int64)
        bad = np.flatnonzero(chunk < 0)
        if bad.size:
            i = lo + int(bad[0])
            raise DataError(
                f"{idx_file}: negative length {int(sizes[i])} of sequence {i} at byte {HEADER_BYTES + 4 * i}",
                hint="corrupt index; run python -m engine.prepare --verify",
            )
        expected = running + np.concatenate([[0], np.cumsum(chunk[:-1])]) * itemsize
        bad = np.flatnonzero(pointers[lo : lo + CHECK_CHUNK] != expected)
        if bad.size:
            i = lo + int(bad[0])
            raise DataError(
                f"{idx_file}: pointer of sequence {i} is {int(pointers[i])}, expected "
                f"{int(expected[i - lo])}, at byte {HEADER_BYTES + 4 * n + 8 * i}",
                hint="corrupt index; run python -m engine.prepare --verify",
            )
        running = int(expected[-1]) + int(chunk[-1]) * itemsize


class IndexedDataset:
    """Memory-mapped reader of ``<prefix>.bin/.idx``; opening runs only O(1) checks plus the total size.

    ``ds[i]`` is sequence (document) ``i`` as a read-only view into the page cache; ``get(i, offset,
    length)`` slices it without touching the rest of the document.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        self.idx_file = idx_path(self.prefix)
        self.bin_file = bin_path(self.prefix)
        header = IndexHeader.read(self.idx_file)
        self.header = header
        self.dtype = header.dtype
        n = header.num_sequences
        idx_mm = _map_readonly(self.idx_file)
        off = HEADER_BYTES
        self.sizes = np.frombuffer(idx_mm, dtype="<i4", count=n, offset=off)
        self.pointers = np.frombuffer(idx_mm, dtype="<i8", count=n, offset=off + 4 * n)
        self.doc_idx = np.frombuffer(idx_mm, dtype="<i8", count=header.num_doc_idx, offset=off + 12 * n)
        self._idx_mm = idx_mm
        check_lengths_and_pointers(self.idx_file, self.sizes, self.pointers, self.dtype.itemsize)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        expected = self.num_tokens * self.dtype.itemsize
        try:
            actual = os.path.getsize(self.bin_file)
        except OSError as err:
            raise DataError(
                f"{self.bin_file}: cannot read ({err.strerror})", hint="the .bin is missing beside its .idx"
            ) from None
        if actual != expected:
            raise DataError(
                f"{self.bin_file}: data is {actual} bytes but {self.idx_file} sums to {self.num_tokens} "
                f"tokens "
                f"x {self.dtype.itemsize} bytes = {expected} (first byte off: {min(actual, expected)})",
                hint="the .bin is truncated or belongs to another index; re-run engine.prepare",
            )
        if n and (
            self.pointers[0] != 0 or int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize != expected
        ):
            raise DataError(
                f"{self.idx_file}: sequence pointers (byte {HEADER_BYTES + 4 * n}) do not span the .bin",
                hint="corrupt index; run python -m engine.prepare --verify",
            )
        self._bin = np.frombuffer(_map_readonly(self.bin_file), dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents in {self.prefix}")
        i = i % len(self)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``i`` (to its end when ``length`` is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) outside document {i} of {size} tokens")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    @property
    def tokens(self) -> np.ndarray:
        """The whole ``.bin`` as one memory-mapped 1-D array (documents back to back)."""
        return self._bin

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return os.path.exists(idx_path(prefix)) and os.path.exists(bin_path(prefix))
