"""``python -m engine.bench pipeline``: text timeline, bubble next to the formula, PNG, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.benchmarks.pipeline import main
from engine.errors import ConfigError


def test_1f1b_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stages", "2", "--microbatches", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1f1b: p=2, m=3, v=1, fwd 1, bwd 1 per stage"
    assert out[1] == "stage  0 |01.a2b.c|"
    assert out[2] == "stage  1 |.0a1b2c.|"
    assert out[3] == "bubble (idle / ideal): 1/3 = 0.3333   formula: 1/3 = 0.3333"
    assert out[5] == "peak in-flight activations per stage: [2, 1]"


def test_interleaved_report_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "t.png"
    argv = ["--stages", "4", "--microbatches", "8", "--virtual", "2", "--png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bubble (idle / ideal): 3/16 = 0.1875   formula: 3/16 = 0.1875" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_is_refused_until_the_executor_exists() -> None:
    with pytest.raises(ConfigError, match=r"^--measure is not yet available: it needs the pipeline executor"):
        main(["--stages", "2", "--microbatches", "2", "--measure"])
