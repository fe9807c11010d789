"""engine.plot: metrics.jsonl is read line by line with errors naming the file and line, and the four
panels are drawn to a PNG."""

from __future__ import annotations

import json

import pytest

from engine.errors import DataError
from engine.metrics.plot import plot, read_metrics


def test_reads_and_plots(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "loss": 5.0 - i * 0.1, "lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0} for i in range(1, 6)]
    rows.append({"step": 5, "event": "rollback"})  # non-metric events are skipped by the panels
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_metrics(str(path)) == rows
    out = plot(rows, str(tmp_path / "loss.png"))
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(str(path))
    with pytest.raises(DataError, match=r"nope.jsonl: not found"):
        read_metrics(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no metrics yet"):
        read_metrics(str(tmp_path / "empty.jsonl"))
