"""The quickstart end to end at a small size: prepare -> train -> sample; the loss falls on real text."""

import json

from engine.quickstart import main


def test_quickstart_learns_and_reports(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["--out", str(out), "--steps", "24", "--max-files", "40", "--vocab-size", "512", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    for needle in ("final train loss", "validation loss", "sample:", "loss plot", "metrics", "checkpoint"):
        assert needle in text
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(512) = 6.2 down by more than a nat
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0]
    assert (out / "logs" / "loss.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000024"


def test_corpus_is_the_whole_utf8_stdlib():
    from engine.training.quickstart import stdlib_sources

    files = stdlib_sources(None)
    assert len(files) > 500
    for path in files:  # prepare refuses non-UTF-8 text, so the default corpus must be clean
        with open(path, "rb") as fh:
            fh.read().decode("utf-8")
