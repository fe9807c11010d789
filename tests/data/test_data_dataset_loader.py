"""Datasets (packing, splits, blending, checks on open) and the step loader (partition, exact resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data.dataset import SyntheticDataset, build_datasets
from engine.data.loader import StepLoader, rank_sample_ids
from engine.data.shards import shard_prefix, write_meta
from engine.errors import ConfigError, DataError
from tests.data.data_helpers import write_random_shards


def _stream_reference(docs, index, seq_len):
    """Packed sample j rebuilt from scratch: the concatenated stream in doc_idx order, cut at j * seq_len."""
    stream = np.concatenate([docs[g] for g in index.doc_idx]).astype(np.int64)
    return lambda j: stream[j * seq_len : j * seq_len + seq_len + 1]


@pytest.fixture
def sharded(tmp_path):
    """Dataset 'web' as 3 numbered shards (70 documents) and dataset 'code' as one pair (30 documents)."""
    rng = np.random.default_rng(0)
    web_docs = []
    for k, n in enumerate((30, 25, 15)):
        web_docs += write_random_shards(shard_prefix(str(tmp_path / "web"), k), rng.integers(0, 60, n).tolist(), seed=k)
    code_docs = write_random_shards(str(tmp_path / "code"), rng.integers(1, 90, 30).tolist(), seed=9, vocab=500)
    return tmp_path, web_docs, code_docs


def test_samples_are_the_packed_stream_across_shards(sharded):
    tmp, web_docs, _ = sharded
    train, valid = build_datasets(
        [str(tmp / "web")],
        None,
        seq_len=16,
        seed=5,
        num_train_samples=300,
        num_valid_samples=0,
        valid_fraction=0.0,
    )
    assert valid is None and len(train) >= 300
    expected = _stream_reference(web_docs, train.index, 16)
    for i in range(len(train)):
        np.testing.assert_array_equal(train[i], expected(int(train.index.shuffle_idx[i])))
    batch = train.get_batch(np.array([3, 1, 4]))
    assert batch.dtype == np.int64 and batch.shape == (3, 17)
    np.testing.assert_array_equal(batch[1], train[1])


def test_valid_split_is_disjoint_and_deterministic(sharded):
    tmp, web_docs, _ = sharded
    kwargs = dict(seq_len=8, seed=5, num_train_samples=50, num_valid_samples=10, valid_fraction=0.2)
    train, valid = build_datasets([str(tmp / "web")], None, **kwargs)
    train_docs, valid_docs = (
        set(np.asarray(train.index.doc_idx).tolist()),
        set(np.asarray(valid.index.doc_idx).tolist()),
    )
    assert not train_docs & valid_docs and len(valid_docs) == 14 and len(train_docs | valid_docs) == 70
    train2, valid2 = build_datasets([str(tmp / "web")], None, **kwargs)
    np.testing.assert_array_equal(valid.get_batch(np.arange(10)), valid2.get_batch(np.arange(10)))


def test_blend_of_datasets_and_separate_validation(sharded, tmp_path):
    tmp, web_docs, code_docs = sharded
    train, valid = build_datasets(
        [str(tmp / "web"), str(tmp / "code")],
        [3, 1],
        seq_len=8,
        seed=1,
        num_train_samples=400,
        num_valid_samples=20,
        valid_fraction=0.0,
        valid_prefixes=[str(tmp / "code")],
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(train) == 400 and len(valid) >= 20
    assert np.bincount(train.dataset_index).tolist() == [300, 100]
    code = train.datasets[1]
    expected = _stream_reference(code_docs, code.index, 8)
    for i in np.flatnonzero(train.dataset_index == 1)[:20]:
        np.testing.assert_array_equal(train[i], expected(int(code.index.shuffle_idx[train.sample_index[i]])))
    # Other ranks memory-map what build_index=True wrote; build_index=False never builds.
    again, _ = build_datasets(
        [str(tmp / "web"), str(tmp / "code")],
        [3, 1],
        seq_len=8,
        seed=1,
        num_train_samples=400,
        num_valid_samples=0,
        valid_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
        build_index=False,
    )
    np.testing.assert_array_equal(again.get_batch(np.arange(400)), train.get_batch(np.arange(400)))
    with pytest.raises(DataError, match="may not build it"):
        build_datasets(
            [str(tmp / "web")],
            None,
            seq_len=8,
            seed=2,
            num_train_samples=10,
            num_valid_samples=0,
            valid_fraction=0.0,
            cache_dir=str(tmp_path / "cache"),
            build_index=False,
        )


def test_mismatched_tokenizer_and_vocab_are_refused(sharded):
    tmp, _, _ = sharded
    write_meta(str(tmp / "code"), {"tokenizer_sha256": "a" * 64, "vocab_size": 500})
    common = dict(seq_len=8, seed=1, num_train_samples=10, num_valid_samples=0, valid_fraction=0.0)
    with pytest.raises(DataError, match=r"code: shards were made with tokenizer sha256 aaaaaaaaaaaa\.\.\., not the"):
        build_datasets([str(tmp / "code")], None, tokenizer_sha256="b" * 64, **common)
    with pytest.raises(DataError, match="code: tokenizer vocabulary of 500 exceeds model.vocab_size 256"):
        build_datasets([str(tmp / "code")], None, vocab_size=256, **common)
    train, _ = build_datasets([str(tmp / "code")], None, tokenizer_sha256="a" * 64, vocab_size=512, **common)
    assert len(train) >= 10


def test_corrupt_or_missing_shards_are_reported_at_open(sharded):
    tmp, _, _ = sharded
    common = dict(seq_len=8, seed=1, num_train_samples=10, num_valid_samples=0, valid_fraction=0.0)
    with pytest.raises(DataError, match="nope: no shards found"):
        build_datasets([str(tmp / "nope")], None, **common)
    (tmp / "web_00001.bin").write_bytes(b"\0" * 6)
    with pytest.raises(DataError, match="web_00001.bin: data is 6 bytes"):
        build_datasets([str(tmp / "web")], None, **common)
    for ext in ("bin", "idx"):
        (tmp / f"web_00001.{ext}").unlink()
    with pytest.raises(DataError, match="web_00001.idx: shard missing from the set"):
        build_datasets([str(tmp / "web")], None, **common)


def test_synthetic_dataset_is_a_function_of_seed_and_id():
    a, b = SyntheticDataset(100, 12, seed=3), SyntheticDataset(100, 12, seed=3)
    np.testing.assert_array_equal(a.get_batch(np.array([5, 9])), np.stack([b[5], b[9]]))
    assert not np.array_equal(a[5], SyntheticDataset(100, 12, seed=4)[5])
    assert a[0].shape == (13,) and a[0].max() < 100


def test_rank_partition_covers_each_global_batch_once():
    g, m = 24, 2
    for dp in (1, 2, 3, 4, 6):
        ids = np.stack(
            [rank_sample_ids(48, global_batch_size=g, micro_batch_size=m, dp_rank=r, dp_size=dp) for r in range(dp)]
        )
        assert ids.shape == (dp, g // (m * dp), m)
        assert sorted(ids.ravel().tolist()) == list(range(48, 72))
    assert rank_sample_ids(0, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2).tolist() == [
        [2, 3],
        [6, 7],
    ]


def _global_batches(dataset, *, dp, steps, g=12, m=2, start=0, prefetch=2):
    """Per step, the union of all DP ranks' samples ordered by sample id (rank slices interleaved back)."""
    loaders = [
        StepLoader(
            dataset,
            global_batch_size=g,
            micro_batch_size=m,
            dp_rank=r,
            dp_size=dp,
            consumed_samples=start,
            prefetch=prefetch,
        )
        for r in range(dp)
    ]
    out = []
    for _ in range(steps):
        per_rank = [torch.cat(ld.next_step()) for ld in loaders]
        ids = [ld.step_ids(ld.consumed_samples - g).reshape(-1) for ld in loaders]
        order = np.argsort(np.concatenate(ids))
        out.append(torch.cat(per_rank)[torch.from_numpy(order)])
    for ld in loaders:
        ld.close()
    return out, loaders[0].state_dict()


def test_loader_resume_is_exact_including_dp_change(sharded):
    tmp, _, _ = sharded
    train, _ = build_datasets(
        [str(tmp / "web")],
        None,
        seq_len=8,
        seed=1,
        num_train_samples=12 * 8,
        num_valid_samples=0,
        valid_fraction=0.0,
    )
    straight, _ = _global_batches(train, dp=1, steps=8)
    for s, batch in enumerate(straight):  # step s is sample ids [s*G, (s+1)*G)
        np.testing.assert_array_equal(batch.numpy(), train.get_batch(np.arange(s * 12, (s + 1) * 12)))
    first, state = _global_batches(train, dp=2, steps=3, prefetch=0)
    assert state == {"consumed_samples": 36}
    loader = StepLoader(train, global_batch_size=12, micro_batch_size=2, dp_rank=0, dp_size=3)
    loader.load_state_dict(json.loads(json.dumps(state)))
    rest, _ = _global_batches(train, dp=3, steps=5, start=loader.consumed_samples)
    for a, b in zip(straight, first + rest):
        assert torch.equal(a, b)


def test_loader_shapes_and_errors(sharded):
    tmp, _, _ = sharded
    train, _ = build_datasets(
        [str(tmp / "web")],
        None,
        seq_len=8,
        seed=1,
        num_train_samples=16,
        num_valid_samples=0,
        valid_fraction=0.0,
    )
    loader = StepLoader(train, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2, prefetch=0)
    step = loader.next_step()
    assert len(step) == 2 and all(t.dtype == torch.int64 and t.shape == (2, 9) for t in step)
    with pytest.raises(ConfigError, match="train_batch_size 10 is not a multiple of micro batch 2 x DP 2"):
        StepLoader(train, global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=2)
    far = StepLoader(train, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1, consumed_samples=len(train))
    with pytest.raises(DataError, match="num_train_samples"):
        far.next_step()
