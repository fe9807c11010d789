"""MMapIndexedDataset writer/reader: round trips, Megatron-LM compatibility, cheap checks on open."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from engine.data.indexed import MAGIC, IndexedDataset, IndexedDatasetWriter
from engine.errors import DataError
from tests.data.data_helpers import write_random_shards


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip(tmp_path, dtype):
    sizes = [5, 0, 17, 1, 300]
    docs = write_random_shards(str(tmp_path / "d"), sizes, dtype=dtype, vocab=200)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 5 and ds.dtype == np.dtype(dtype)
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64
    assert ds.sizes.tolist() == sizes
    assert ds.doc_idx.tolist() == list(range(6))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(4, 10, 7), docs[4][10:17])
    assert ds.get(1).size == 0


def test_idx_layout_bytes(tmp_path):
    write_random_shards(str(tmp_path / "d"), [3, 2], dtype=np.uint16)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == MAGIC
    assert struct.unpack_from("<QBQQ", raw, 9) == (1, 8, 2, 3)  # version, uint16 code, sizes, doc idx entries
    assert struct.unpack_from("<2i2q3q", raw, 34) == (3, 2, 0, 6, 0, 1, 2)


def test_no_final_files_before_finalize(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "d", dtype=np.uint16)
    w.add_document([1, 2, 3])
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.idx").exists()
    w.abort()
    assert os.listdir(tmp_path) == []


def _megatron():
    pytest.importorskip("megatron.core")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_megatron_reads_trident_files(tmp_path):
    mi = _megatron()
    docs = write_random_shards(str(tmp_path / "d"), [7, 0, 120, 3], dtype=np.uint16)
    theirs = mi.IndexedDataset(str(tmp_path / "d"))
    assert len(theirs) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(5))


def test_trident_reads_megatron_files(tmp_path):
    mi = _megatron()
    import torch

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50000, size=n).astype(np.int32) for n in (4, 9, 1, 33)]
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for d in docs:
        builder.add_document(torch.from_numpy(d), [d.size])
    builder.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    assert ours.dtype == np.int32 and len(ours) == 4
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours[i], d)


def _corrupt(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: _corrupt(p + ".idx", 0, b"XXIDIDX"), "bad magic at byte 0"),
        (lambda p: _corrupt(p + ".idx", 9, struct.pack("<Q", 7)), "unsupported version 7 at byte 9"),
        (lambda p: _corrupt(p + ".idx", 17, b"\x09"), "unknown dtype code 9 at byte 17"),
        (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), "implies"),
        (lambda p: os.truncate(p + ".bin", 10), "data is 10 bytes but"),
        (lambda p: os.remove(p + ".bin"), "cannot read"),
    ],
)
def test_open_runs_cheap_checks(tmp_path, mutate, message):
    prefix = str(tmp_path / "d")
    write_random_shards(prefix, [5, 6, 7])
    mutate(prefix)
    with pytest.raises(DataError, match="d\\.(idx|bin)") as err:
        IndexedDataset(prefix)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
