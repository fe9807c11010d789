"""Hostile inputs (issue 10, item 7): fuzzed configs, token shards and checkpoints never traceback.

* config: random JSON trees over the real key names, random bytes as the file, random ``--set`` overrides:
  each is accepted or refused with a ``ConfigError``; the CLI turns a refusal into exit 2 and one line;
* token shards: truncations and random bytes in the header, lengths, pointers and document index are
  refused at open with a ``DataError`` naming the file and a byte offset, or open consistently (every
  document lies inside the ``.bin`` and has its recorded length); ids >= the vocabulary fail ``--verify``;
* checkpoints: one saved by another model config is refused with the mismatching tensor named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import TridentConfig, load_config, parse_config
from engine.data.indexed import HEADER_BYTES, IndexedDataset, IndexedDatasetWriter
from engine.data.shards import ShardSet
from engine.data.verify import verify_prefix
from engine.errors import CheckpointError, ConfigError, DataError
from tests.helpers import BASE, make_config, make_trainer

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------------- config


def _key_names(cls: type, out: set[str]) -> set[str]:
    """Every field name (and alias) of the config dataclasses: fuzzed trees use the real vocabulary."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.add(f.name)
        if "alias" in f.metadata:
            out.add(f.metadata["alias"])
        for tp in (hints[f.name], *typing.get_args(hints[f.name])):
            for inner in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(inner) and inner is not cls:
                    _key_names(inner, out)
    return out


KEYS = sorted(_key_names(TridentConfig, set()) | {"type", "params", "enabled", "stage", "auto", "x"})
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["auto", "AdamW", "gpt2", "llama", "cpu", "1f1b", "linear", "", "nan", "1e400"])
    | st.text(max_size=8)
)
JSON = st.recursive(
    SCALARS,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), kids, max_size=5)
    ),
    max_leaves=25,
)
PATHS = st.lists(st.sampled_from(KEYS), min_size=1, max_size=4).map(".".join)


def _accepted_or_refused(fn, *args) -> None:
    try:
        cfg = fn(*args)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err), repr(err)
    else:
        assert isinstance(cfg, TridentConfig)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(KEYS), JSON, max_size=8))
def test_random_trees_are_accepted_or_refused_with_a_config_error(tree):
    _accepted_or_refused(parse_config, tree)


@FUZZ
@given(edits=st.lists(st.tuples(PATHS, JSON), min_size=1, max_size=4))
def test_random_edits_of_a_valid_config_are_accepted_or_refused(edits):
    raw = copy.deepcopy(BASE)
    for path, value in edits:  # set a realistic key path deep inside a config that otherwise parses
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    _accepted_or_refused(parse_config, raw)


@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            st.builds(lambda p, v: f"{p}={json.dumps(v)}", PATHS, JSON),
            st.builds(lambda p, t: f"{p}={t}", PATHS, st.text(max_size=10)),
            st.text(max_size=20),
        ),
        max_size=4,
    )
)
def test_random_set_overrides_are_accepted_or_refused(tmp_path, overrides):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(BASE))
    _accepted_or_refused(load_config, str(path), overrides)


@FUZZ
@given(
    data=st.binary(max_size=200)
    | st.builds(lambda t: t.encode(), st.text(max_size=60))
    | JSON.map(lambda v: json.dumps(v).encode()),
    overrides=st.lists(st.sampled_from(["train.max_steps=3", "model.d_model=64", "a.b=1"]), max_size=2),
)
def test_random_files_are_accepted_or_refused(tmp_path, data, overrides):
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    _accepted_or_refused(load_config, str(path), overrides)


def test_deeply_nested_json_is_refused():
    # json's recursive decoder raises RecursionError on very deep nesting; a hostile file must not traceback.
    depth = 100_000
    _accepted_or_refused(parse_config, json.loads("[" * 50 + "]" * 50))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trident-deep-{os.getpid()}.json"
    try:
        path.write_text("[" * depth + "]" * depth)
        _accepted_or_refused(load_config, str(path), [])
    finally:
        path.unlink()


@pytest.mark.parametrize(
    "content, overrides, expected",
    [
        (b'{"model": {"d_model": 32,}}', [], "invalid JSON at line 1"),
        (b"\xff\xfe\x00garbage", [], "not UTF-8 text"),
        (
            json.dumps({**BASE, "optimizer": {"type": "AdamW", "params": {"lrr": 1}}}).encode(),
            [],
            "optimizer.params.lrr: unknown key (hint: did you mean 'lr'?)",
        ),
        (json.dumps(BASE).encode(), ["train.max_steps"], "--set train.max_steps: expected KEY=VALUE"),
        (b"[1, 2]", ["train.max_steps=3"], "the top level must be a JSON object"),
    ],
    ids=["bad-json", "not-utf8", "unknown-key", "bad-set", "list-top-level"],
)
def test_cli_refusals_exit_2_with_one_line(tmp_path, content, overrides, expected):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    cmd = [sys.executable, "-m", "engine.train", "--config", str(path)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-3000:]


# ---------------------------------------------------------------------- token shards

DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


def _write_shard(prefix: Path, docs=DOCS, dtype=np.uint16) -> tuple[bytes, bytes]:
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for d in docs:
            w.add_document(d)
    return Path(f"{prefix}.idx").read_bytes(), Path(f"{prefix}.bin").read_bytes()


def _open_consistently_or_refuse(prefix: Path) -> None:
    """The property: a DataError naming the file and a byte, or a dataset whose every document is sound."""
    try:
        ds = IndexedDataset(prefix)
        shards = ShardSet(str(prefix))
    except DataError as err:
        text = str(err)
        assert (f"{prefix}.idx" in text or f"{prefix}.bin" in text) and "byte" in text, text
        return
    bin_items = os.path.getsize(f"{prefix}.bin") // ds.dtype.itemsize
    assert len(shards) == len(ds) and shards.num_tokens == ds.num_tokens
    for i in range(len(ds)):
        size, start = int(ds.sizes[i]), int(ds.pointers[i])
        assert size >= 0 and start >= 0 and start % ds.dtype.itemsize == 0, (i, size, start)
        assert start // ds.dtype.itemsize + size <= bin_items, (i, size, start)
        assert len(ds[i]) == size and len(ds.get(i)) == size


REGIONS = {  # (start, end) byte ranges of the 5-document index above
    "header": (0, HEADER_BYTES),
    "lengths": (HEADER_BYTES, HEADER_BYTES + 4 * len(DOCS)),
    "pointers": (HEADER_BYTES + 4 * len(DOCS), HEADER_BYTES + 12 * len(DOCS)),
    "doc_idx": (HEADER_BYTES + 12 * len(DOCS), HEADER_BYTES + 12 * len(DOCS) + 8 * (len(DOCS) + 1)),
}


@FUZZ
@given(region=st.sampled_from(sorted(REGIONS)), data=st.data())
def test_random_bytes_in_the_index_are_refused_or_read_consistently(tmp_path_factory, region, data):
    prefix = tmp_path_factory.mktemp("shard") / "s"
    idx, _ = _write_shard(prefix)
    lo, hi = REGIONS[region]
    at = data.draw(st.integers(lo, hi - 1), label="offset")
    junk = data.draw(st.binary(min_size=1, max_size=hi - at), label="bytes")
    Path(f"{prefix}.idx").write_bytes(idx[:at] + junk + idx[at + len(junk) :])
    _open_consistently_or_refuse(prefix)


@FUZZ
@given(which=st.sampled_from(["idx", "bin"]), keep=st.floats(0.0, 1.0), extra=st.binary(max_size=9))
def test_truncated_or_extended_files_are_refused(tmp_path_factory, which, keep, extra):
    prefix = tmp_path_factory.mktemp("shard") / "s"
    _write_shard(prefix)
    path = Path(f"{prefix}.{which}")
    raw = path.read_bytes()
    changed = raw[: int(len(raw) * keep)] + extra
    path.write_bytes(changed)
    if len(changed) == len(raw):  # a tail rewritten in place: the random-bytes case
        _open_consistently_or_refuse(prefix)
        return
    with pytest.raises(DataError, match=r"byte") as err:
        IndexedDataset(prefix)
    assert str(path) in str(err.value)


def test_crafted_lengths_and_pointers_that_keep_the_totals_are_refused_or_consistent(tmp_path):
    """Corruptions that pass the size and first/last-pointer checks: a negative length balanced by a longer
    one, and a middle pointer aimed past the end of the .bin."""
    prefix = tmp_path / "s"
    idx, _ = _write_shard(prefix)
    n = len(DOCS)
    sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=HEADER_BYTES).copy()
    pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=HEADER_BYTES + 4 * n).copy()
    sizes[1], sizes[2] = -1, sizes[2] + sizes[1] + 1  # same sum
    Path(f"{prefix}.idx").write_bytes(idx[:HEADER_BYTES] + sizes.tobytes() + idx[HEADER_BYTES + 4 * n :])
    _open_consistently_or_refuse(prefix)
    pointers[2] = 10_000  # far past the 30-byte .bin
    Path(f"{prefix}.idx").write_bytes(idx[: HEADER_BYTES + 4 * n] + pointers.tobytes() + idx[HEADER_BYTES + 12 * n :])
    _open_consistently_or_refuse(prefix)


def test_token_ids_beyond_the_vocabulary_fail_verify(tmp_path):
    prefix = tmp_path / "s"
    _write_shard(prefix, docs=[[1, 2, 3], [4, 96, 5]])
    verify_prefix(str(prefix), vocab_size=97)
    with pytest.raises(DataError, match=r"s\.bin: token id 96 >= vocab size 96 \(or negative\) at byte 8"):
        verify_prefix(str(prefix), vocab_size=96)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.prepare", "--verify", str(prefix), "--vocab-size", "96"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}.bin: token id 96 >= vocab size 96"), lines


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"d_model": 48}, r"tensor \S+ has shape \(\d+, 48\) in this model|tensor \S+ has shape"),
        ({"n_layers": 3}, r"checkpoint does not fit this model \(missing \S*2\S*\)"),
        ({"vocab_size": 128}, r"tensor \S*emb\S* has shape"),
    ],
)
def test_checkpoint_of_another_model_is_refused_naming_the_tensor(tmp_path, model, expected):
    save = {"max_steps": 2, "save_dir": str(tmp_path / "ckpt"), "save_interval": 2}
    make_trainer(make_config(tmp_path, train={**BASE["train"], **save})).fit()
    other = make_config(tmp_path, model={**BASE["model"], **model}, train={**BASE["train"], **save})
    with pytest.raises(CheckpointError, match=expected) as err:
        make_trainer(other, resume=True)
    assert str(tmp_path / "ckpt") in str(err.value)
