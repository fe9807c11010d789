"""Parquet input (optional pyarrow): the text column tokenizes exactly like the same documents as JSONL."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.indexed import IndexedDataset
from engine.errors import DataError
from engine.prepare import main
from tests.data.data_helpers import write_jsonl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def test_parquet_equals_jsonl(tmp_path, tokenizer, corpus_docs):
    docs = corpus_docs[:40]
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), tmp_path / "a.parquet", row_group_size=7)
    write_jsonl(tmp_path / "a.jsonl", docs)
    common = ["--tokenizer", str(tokenizer.path), "--workers", "2", "--no-progress"]
    assert (
        main(
            [
                "--input",
                str(tmp_path / "a.parquet"),
                "--text-key",
                "content",
                "--output-prefix",
                str(tmp_path / "pq"),
                *common,
            ]
        )
        == 0
    )
    assert main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "js"), *common]) == 0
    assert _docs(tmp_path / "pq") == _docs(tmp_path / "js")
    assert len(_docs(tmp_path / "pq")) == len(docs)
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(columns: id, content\)"):
        main(["--input", str(tmp_path / "a.parquet"), "--output-prefix", str(tmp_path / "x"), *common])
