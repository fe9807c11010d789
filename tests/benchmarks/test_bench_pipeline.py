"""``python -m engine.bench pipeline``: text timeline, bubble next to the formula, PNG, refusals."""

from __future__ import annotations

import re
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


def test_measure_runs_the_executor_and_reports_idle_next_to_formula(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--measure",
        "--steps",
        "1",
        "--d-model",
        "32",
        "--seq-len",
        "16",
        "--micro-batch",
        "2",
        "--layers-per-chunk",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index(next(line for line in out if line.startswith("measured: 2 gloo ranks")))
    assert out[start + 1].startswith("stage  0 |0") and out[start + 2].startswith("stage  1 |.")
    last = out[-1]
    assert re.fullmatch(
        r"measured idle fraction: (\d+\.\d{4}) \(steps: \d+\.\d{3}\)   simulated at these op times: "
        r"\d+\.\d{4}   formula: 1/2 = 0\.5000",
        last,
    ), last
    assert float(last.split()[3]) > 0  # a real pipeline of 2 stages always idles


def test_measure_refuses_a_single_stage() -> None:
    with pytest.raises(ConfigError, match=r"^--stages 1: --measure needs at least 2 pipeline stages"):
        main(["--stages", "1", "--microbatches", "2", "--measure"])
