"""Index math: C++ == numpy reference, == Megatron-LM's helper, shuffle and blending properties, cache."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import index_reference as ref
from engine.data import sample_index as si
from engine.errors import DataError

needs_cpp = pytest.mark.skipif(
    not si.have_cpp(), reason="C++ extension not built (python setup.py build_ext --inplace)"
)


def _random_case(rng):
    n = int(rng.integers(1, 120))
    sizes = rng.integers(0, 40, size=n).astype(np.int32)
    if rng.random() < 0.3:
        sizes[rng.integers(0, n)] = int(rng.integers(200, 2000))  # a document longer than many samples
    if rng.random() < 0.3:
        sizes[rng.random(n) < 0.5] = 0  # many empty documents
    epochs = int(rng.integers(1, 4))
    doc_idx = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return sizes, doc_idx, int(rng.integers(1, 64))


@needs_cpp
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_pack_cpp_equals_numpy_random(dtype):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        sizes, doc_idx, seq_len = _random_case(rng)
        total = int(sizes[doc_idx].sum())
        if total < seq_len + 1:
            continue
        num = (total - 1) // seq_len
        expected = ref.build_sample_idx_reference(sizes, doc_idx.astype(dtype), seq_len, num)
        for threads in (1, 2, 3):
            got = si.build_sample_idx(sizes, doc_idx.astype(dtype), seq_len, num, num_threads=threads)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, expected)
        checked += 1
    assert checked > 200


@needs_cpp
@pytest.mark.parametrize(
    "sizes, seq_len",
    [([1000], 7), ([0, 0, 9, 0], 4), ([5], 4), ([0, 3, 0, 0, 2], 1), ([2] * 5, 3)],
    ids=["one-long-doc", "empties", "exactly-one-sample", "seq1", "doc-shorter-than-sample"],
)
def test_pack_edge_cases(sizes, seq_len):
    sizes = np.array(sizes, dtype=np.int32)
    doc_idx = np.arange(sizes.size, dtype=np.int32)
    num = (int(sizes.sum()) - 1) // seq_len
    expected = ref.build_sample_idx_reference(sizes, doc_idx, seq_len, num)
    np.testing.assert_array_equal(si.build_sample_idx(sizes, doc_idx, seq_len, num), expected)
    # Each row points at stream token i * seq_len (row 0 at (0, 0) by Megatron's convention).
    starts = np.concatenate([[0], np.cumsum(sizes)])
    assert [starts[p] + o for p, o in expected[1:]] == [i * seq_len for i in range(1, num + 1)]


@needs_cpp
def test_pack_refuses_too_few_tokens():
    with pytest.raises(RuntimeError, match="fewer tokens"):
        si.build_sample_idx(np.array([3, 3], np.int32), np.array([0, 1], np.int32), 3, 2)
    with pytest.raises(RuntimeError, match="fewer tokens"):
        ref.build_sample_idx_reference(np.array([3, 3], np.int32), np.array([0, 1], np.int32), 3, 2)


def test_pack_equals_megatron_helper():
    pytest.importorskip("megatron.core")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 200))
        sizes = rng.integers(1, 60, size=n).astype(np.int32)
        doc_idx = rng.permutation(n).astype(np.int32)
        seq_len, total = int(rng.integers(2, 50)), int(sizes.sum())
        if total <= seq_len + 1:
            continue
        theirs = helpers_cpp.build_sample_idx_int32(sizes, doc_idx, seq_len, 1, total, True, 1)
        ours = si.build_sample_idx(sizes, doc_idx, seq_len, (total - 1) // seq_len)
        np.testing.assert_array_equal(ours, theirs)


@needs_cpp
def test_shuffle_cpp_equals_numpy_and_is_a_permutation():
    rng = np.random.default_rng(2)
    for n in [0, 1, 2, 3, 17, 1000]:
        key = int(rng.integers(0, 2**63))
        a, b = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int32)
        ref.shuffle_reference(a, key)
        si.shuffle_inplace(b, key)
        np.testing.assert_array_equal(a, b)
        assert sorted(a.tolist()) == list(range(n))
    x, y = np.arange(100, dtype=np.int64), np.arange(100, dtype=np.int64)
    si.shuffle_inplace(x, si.derive_key(1, 0))
    si.shuffle_inplace(y, si.derive_key(2, 0))
    assert not np.array_equal(x, y)


@needs_cpp
def test_blend_cpp_equals_numpy():
    rng = np.random.default_rng(4)
    for _ in range(60):
        d = int(rng.integers(1, 7))
        w = rng.random(d) * 10  # deliberately not summing to 1
        w[rng.random(d) < 0.2] = 0
        if w.sum() == 0:
            w[-1] = 0.5
        n = int(rng.integers(0, 4000))
        got = si.build_blend_idx(w, n)
        want = ref.build_blend_idx_reference(w / w.sum(), n)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("use_cpp", [True, False])
def test_blend_proportions_within_one_percent(use_cpp):
    weights = [0.67, 0.15, 0.045, 0.135]
    n = 10_000
    dataset, sample = si.build_blend_idx([x * 3 for x in weights], n, use_cpp=use_cpp)
    counts = np.bincount(dataset, minlength=4)
    assert np.all(np.abs(counts / n - np.array(weights)) < 0.01)
    # Every prefix stays within 1.5 samples of its share, and dataset d's samples are 0, 1, 2, ...
    prefix = np.cumsum(np.eye(4)[dataset], axis=0)
    assert np.abs(prefix - np.arange(1, n + 1)[:, None] * np.array(weights)).max() < 1.5
    for d in range(4):
        assert sample[dataset == d].tolist() == list(range(counts[d]))


def test_blend_refuses_bad_weights():
    with pytest.raises(DataError, match="weights must be finite, >= 0 and not all 0"):
        si.build_blend_idx([0.0, 0.0], 10)
    with pytest.raises(DataError, match="weights must be"):
        si.build_blend_idx([1.0, -0.5], 10)


def test_sample_index_is_a_global_shuffle():
    # 40 "shards" of 25 documents each: the first samples must come from many shards, not one block.
    sizes = np.full(1000, 20, dtype=np.int32)
    index = si.compute_sample_index(sizes, np.arange(1000), seq_len=10, seed=7, num_samples=1000)
    num_packed = (20_000 - 1) // 10
    assert len(index) == num_packed
    assert sorted(np.asarray(index.shuffle_idx).tolist()) == list(range(num_packed))
    first_docs = index.doc_idx[index.sample_idx[index.shuffle_idx[:100], 0]]
    assert len(set((first_docs // 25).tolist())) > 30
    again = si.compute_sample_index(sizes, np.arange(1000), seq_len=10, seed=7, num_samples=1000, use_cpp=False)
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(index, name), getattr(again, name))


def test_epochs_are_reshuffled_and_kept_apart():
    sizes = np.full(50, 11, dtype=np.int32)  # 550 tokens per epoch
    index = si.compute_sample_index(sizes, np.arange(50), seq_len=10, seed=3, num_samples=160)
    assert len(index) >= 160 and index.doc_idx.size == 150  # three epochs
    e0, e1 = index.doc_idx[:50], index.doc_idx[50:100]
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(50)) and not np.array_equal(e0, e1)
    # Samples starting in epoch 0 (tokens [0, 550) -> ids [0, 55)) fill the first 55 slots.
    assert sorted(np.asarray(index.shuffle_idx[:55]).tolist()) == list(range(55))


def test_too_few_tokens_is_a_data_error():
    with pytest.raises(DataError, match="tiny: 5 tokens in 2 documents, fewer than one sample"):
        si.compute_sample_index(np.array([2, 3], np.int32), np.arange(2), seq_len=8, seed=0, num_samples=1, name="tiny")


def test_cache_builds_once_and_refuses_non_builders(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5)}

    with pytest.raises(DataError, match="sample index not found and this rank may not build it"):
        si.load_or_build(str(tmp_path), "x", "k1", ("a",), build, build=False)
    first = si.load_or_build(str(tmp_path), "x", "k1", ("a",), build, build=True)
    second = si.load_or_build(str(tmp_path), "x", "k1", ("a",), build, build=False)
    assert calls == [1] and isinstance(second["a"], np.memmap)
    np.testing.assert_array_equal(first["a"], np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-k1"]


def test_cache_key_depends_on_every_input():
    base = si.index_cache_key({"seed": 1}, [np.array([1, 2, 3], np.int32)])
    assert base == si.index_cache_key({"seed": 1}, [np.array([1, 2, 3], np.int32)])
    assert base != si.index_cache_key({"seed": 2}, [np.array([1, 2, 3], np.int32)])
    assert base != si.index_cache_key({"seed": 1}, [np.array([1, 2, 4], np.int32)])
