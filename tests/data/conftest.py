"""Session fixtures: a tiny corpus and tokenizers trained once (under pytest's tmp dirs)."""

from __future__ import annotations

import pytest

from engine.data.tokenizer import Tokenizer
from tests.data.data_helpers import make_docs


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return make_docs(120, seed=1)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus_docs) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    return Tokenizer.train(corpus_docs, model_prefix=folder / "tok", vocab_size=300)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory, corpus_docs) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok2")
    return Tokenizer.train(corpus_docs, model_prefix=folder / "tok", vocab_size=280)
