"""docs/config.md is exactly what the schema generates (regenerate: python -m engine.config.reference)."""

from __future__ import annotations

import pathlib

from engine.config import TridentConfig
from engine.config.reference import main, render
from engine.config.schema import reference_rows

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_committed_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), "run: python -m engine.config.reference"
    assert main(["--check", "--out", str(DOC)]) == 0


def test_every_schema_key_is_documented():
    text = render()
    for key, _typ, _default, doc in reference_rows(TridentConfig):
        assert f"| `{key}` |" in text or f"## `{key}`" in text
        assert doc, f"{key} has no doc"


def test_check_flags_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("old\n", encoding="utf-8")
    assert main(["--check", "--out", str(stale)]) == 1
    assert "is out of date" in capsys.readouterr().err
