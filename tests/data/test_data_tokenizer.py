"""SentencePiece wrapper: fixed special ids, lossless round trips, deterministic training, clear errors."""

from __future__ import annotations

import pytest

from engine.data.tokenizer import Tokenizer, file_sha256
from engine.errors import DataError


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 300
    assert tokenizer.sha256 == file_sha256(tokenizer.path)


@pytest.mark.parametrize("text", ["alpha beta\n\tgamma  delta\n", "  leading and trailing  ", "漢字 😀 ü\r\n", ""])
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_training_is_deterministic_and_path_independent(tmp_path, corpus_docs, tokenizer):
    again = Tokenizer.train(corpus_docs, model_prefix=tmp_path / "elsewhere" / "t", vocab_size=300)
    assert again.sha256 == tokenizer.sha256


def test_train_from_files_equals_train_from_texts(tmp_path, corpus_docs, tokenizer):
    files = []
    for i, doc in enumerate(corpus_docs):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(doc + "\n", encoding="utf-8")
    from_files = Tokenizer.train(files, model_prefix=tmp_path / "f", vocab_size=300, files=True)
    assert from_files.sha256 == tokenizer.sha256


def test_unigram_and_user_symbols(tmp_path, corpus_docs):
    tok = Tokenizer.train(
        corpus_docs,
        model_prefix=tmp_path / "u",
        vocab_size=400,
        model_type="unigram",
        user_defined_symbols=["<|tool|>"],
    )
    ids = tok.encode("x <|tool|> y")
    assert tok._sp.PieceToId("<|tool|>") in ids
    assert tok.decode(ids) == "x <|tool|> y"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.model: tokenizer model not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model: not a SentencePiece model"):
        Tokenizer.load(bad)


def test_loaded_model_without_pad_reports_minus_one(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f"] * 20),
        model_writer=buf,
        vocab_size=20,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (tmp_path / "plain.model").write_bytes(buf.getvalue())
    tok = Tokenizer.load(tmp_path / "plain.model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
