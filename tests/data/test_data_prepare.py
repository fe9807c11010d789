"""engine.prepare: round trip to SentencePiece's encoding, worker-count determinism, sharding, dedup,
CLI errors (one line, exit 2) and every --verify failure on deliberately corrupted files."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from engine.data.dataset import build_datasets
from engine.data.indexed import IndexedDataset
from engine.data.shards import resolve_shards
from engine.prepare import main
from tests.data.data_helpers import make_docs, write_jsonl

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _prepare(*args) -> int:
    return main([*map(str, args), "--no-progress"])


@pytest.fixture
def jsonl_corpus(tmp_path, corpus_docs):
    write_jsonl(tmp_path / "a.jsonl", corpus_docs[:70])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in corpus_docs[70:] + corpus_docs[:5]:  # five exact duplicates of a.jsonl documents
            f.write(json.dumps({"body": "x", "text": d}) + "\n")
        f.write(json.dumps({"text": "   "}) + "\n")  # whitespace only: skipped
    return tmp_path


def _all_docs(prefix):
    return [
        np.asarray(ds[i]).tolist() for p in resolve_shards(prefix) for ds in [IndexedDataset(p)] for i in range(len(ds))
    ]


def test_round_trip_equals_sentencepiece(jsonl_corpus, tokenizer, corpus_docs, capsys):
    out = jsonl_corpus / "out" / "c"
    assert (
        _prepare(
            "--input",
            jsonl_corpus / "a.jsonl",
            jsonl_corpus / "b.jsonl.gz",
            "--output-prefix",
            out,
            "--tokenizer",
            tokenizer.path,
            "--workers",
            1,
        )
        == 0
    )
    expected = [tokenizer.encode(d) + [tokenizer.eos_id] for d in corpus_docs + corpus_docs[:5]]
    assert _all_docs(str(out)) == expected
    assert IndexedDataset(out).dtype == np.uint16
    meta = json.loads((out.parent / "c.meta.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer.sha256 and meta["vocab_size"] == 300
    assert (out.parent / "c.tokenizer.model").read_bytes() == open(tokenizer.path, "rb").read()
    summary = capsys.readouterr().out
    assert f"{len(expected)} documents" in summary and "skipped 1 empty" in summary
    train, _ = build_datasets(
        [str(out)],
        None,
        seq_len=16,
        seed=0,
        num_train_samples=4,
        num_valid_samples=0,
        valid_fraction=0.0,
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=300,
    )
    assert len(train) >= 4


def test_output_identical_for_any_worker_count_and_sharding(jsonl_corpus, tokenizer):
    outputs = {}
    for workers in (1, 2, 3):
        out = jsonl_corpus.parent / f"{jsonl_corpus.name}-w{workers}" / "c"
        _prepare(
            "--input",
            jsonl_corpus,
            "--output-prefix",
            out,
            "--tokenizer",
            tokenizer.path,
            "--workers",
            workers,
            "--shard-tokens",
            2000,
            "--dedup",
        )
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.parent.iterdir())}
    assert outputs[1] == outputs[2] == outputs[3]
    names = sorted(outputs[1])
    assert "c_00000.bin" in names and "c_00001.idx" in names and "c.bin" not in names
    meta = json.loads(outputs[1]["c.meta.json"])
    assert meta["duplicates_removed"] == 5 and meta["documents"] == 120
    shards = resolve_shards(str(jsonl_corpus.parent / f"{jsonl_corpus.name}-w1" / "c"))
    tokens = [IndexedDataset(p).num_tokens for p in shards]
    assert all(t >= 2000 for t in tokens[:-1]) and sum(tokens) == meta["tokens"]


def test_train_tokenizer_and_txt_modes(tmp_path):
    docs = make_docs(40, seed=5)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "in" / "prose.md").write_text("one\ntwo\n\n\nthree\n  \nfour", encoding="utf-8")
    out = tmp_path / "o" / "t"
    assert (
        _prepare(
            "--input",
            tmp_path / "in",
            "--text-suffixes",
            ".md",
            "--txt-mode",
            "blank-line",
            "--output-prefix",
            out,
            "--train-tokenizer",
            "--vocab-size",
            320,
            "--workers",
            2,
        )
        == 0
    )
    from engine.data.tokenizer import Tokenizer

    tok = Tokenizer.load(str(out) + ".tokenizer.model")
    decoded = [tok.decode(d[:-1]) for d in _all_docs(str(out))]
    blocks = [b for d in docs for b in _blank_line_blocks(d)]
    assert decoded == blocks + ["one\ntwo", "three", "four"]


def _blank_line_blocks(text):
    blocks, cur = [], []
    for line in text.splitlines(keepends=True):
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("".join(cur).rstrip("\r\n"))
            cur = []
    if cur:
        blocks.append("".join(cur).rstrip("\r\n"))
    return blocks


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "engine.prepare", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--input", "nothing/*.jsonl", "--output-prefix", "o", "--train-tokenizer", "--vocab-size", "9"],
            "error: --input nothing/*.jsonl: no .txt/.jsonl/.parquet files found",
        ),
        (["--output-prefix", "o"], "error: prepare: --input and --output-prefix are required"),
        (
            ["--input", "x", "--output-prefix", "o", "--workers", "two"],
            "error: prepare: argument --workers: invalid int",
        ),
        (["--verify", "missing/prefix"], "error: missing/prefix: no shards found"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    result = _cli(
        "--input",
        tmp_path / "bad.jsonl",
        "--output-prefix",
        tmp_path / "o",
        "--tokenizer",
        tokenizer.path,
        "--workers",
        2,
        "--no-progress",
    )
    assert result.returncode == 2 and "bad.jsonl:2: invalid JSON" in result.stderr
    assert not list(tmp_path.glob("o*.bin"))


def test_worker_encoding_matches_sentencepiece_and_skips_blank_documents(tokenizer, corpus_docs):
    from engine.data.tokenize_pipeline import encode_unit

    docs = ["", " \t\n", "\u3000\u2029", corpus_docs[0], "x", corpus_docs[1], "\n"]
    flat, lengths, digests, empty = encode_unit(
        (("texts", "mem", docs), tokenizer.path, "text", np.dtype(np.uint16), True)
    )
    kept = [corpus_docs[0], "x", corpus_docs[1]]  # what str.strip() keeps
    expected = [tokenizer.encode(d) + [tokenizer.eos_id] for d in kept]
    assert empty == 4 and lengths.tolist() == [len(e) for e in expected]
    assert flat.dtype == np.uint16 and flat.tolist() == [t for e in expected for t in e]
    assert len(digests) == 3 and len(set(digests)) == 3


def test_tokenizer_without_eos_is_refused(tmp_path, corpus_docs):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_docs), model_writer=model, vocab_size=60, eos_id=-1, minloglevel=2
    )
    (tmp_path / "noeos.model").write_bytes(model.getvalue())
    write_jsonl(tmp_path / "a.jsonl", corpus_docs[:3])
    result = _cli(
        "--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer", tmp_path / "noeos.model"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'noeos.model'}: the tokenizer has no eos piece")


@pytest.fixture
def good_prefix(jsonl_corpus, tokenizer):
    out = jsonl_corpus / "v" / "c"
    _prepare(
        "--input",
        jsonl_corpus / "a.jsonl",
        "--output-prefix",
        out,
        "--tokenizer",
        tokenizer.path,
        "--workers",
        1,
    )
    return str(out)


def _poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _n(prefix):
    return IndexedDataset(prefix).header.num_sequences


CORRUPTIONS = [
    ("magic", lambda p: _poke(p + ".idx", 0, b"NOTMAGIC!"), r"c\.idx: bad magic at byte 0"),
    (
        "version",
        lambda p: _poke(p + ".idx", 9, struct.pack("<Q", 2)),
        r"c\.idx: unsupported version 2 at byte 9",
    ),
    ("dtype", lambda p: _poke(p + ".idx", 17, b"\x00"), r"c\.idx: unknown dtype code 0 at byte 17"),
    (
        "negative-length",
        lambda p: _poke(p + ".idx", 34 + 4 * 3, struct.pack("<i", -1)),
        r"c\.idx: negative length -1 of sequence 3 at byte 46",
    ),
    (
        "pointer",
        lambda p: _poke(p + ".idx", 34 + 4 * _n(p) + 8 * 5, struct.pack("<q", 1)),
        r"c\.idx: pointer of sequence 5 is 1, expected \d+ at byte \d+",
    ),
    (
        "doc-index",
        lambda p: _poke(p + ".idx", 34 + 12 * _n(p) + 8 * 4, struct.pack("<q", 0)),
        r"c\.idx: document index decreases at entry 4, byte \d+",
    ),
    ("bin-size", lambda p: open(p + ".bin", "ab").write(b"\0\0"), r"c\.bin: \d+ bytes but the index sums to"),
    (
        "token-id",
        lambda p: _poke(p + ".bin", 40, struct.pack("<H", 299 + 7)),
        r"c\.bin: token id 306 >= vocab size 300 \(or negative\) at byte 40",
    ),
    (
        "tokenizer",
        lambda p: open(p + ".tokenizer.model", "ab").write(b"x"),
        r"c\.tokenizer\.model: sha256 differs from the one in .*c\.meta\.json",
    ),
]


@pytest.mark.parametrize("name, corrupt, pattern", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_verify_reports_each_corruption(good_prefix, name, corrupt, pattern):
    ok = _cli("--verify", good_prefix)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok {good_prefix}: 1 shard(s), 70 documents")
    corrupt(good_prefix)
    result = _cli("--verify", good_prefix)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert __import__("re").search(pattern, result.stderr), result.stderr
