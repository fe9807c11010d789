"""``python -m engine.bench mfu`` on CPU: both sides train the same preset and the table reports them."""

from __future__ import annotations

import re

from engine.benchmarks.mfu import bench_config, main


def test_bench_config_is_the_preset():
    raw = bench_config("gpt2-350m", seq=1024, micro_batch=8, bf16=True, max_steps=13, log_dir="x", peak_tflops=None)
    assert (raw["model"]["n_layers"], raw["model"]["d_model"], raw["model"]["n_heads"]) == (24, 1024, 16)
    assert raw["train_batch_size"] == raw["train_micro_batch_size_per_gpu"] == 8
    assert raw["train"]["max_steps"] == 13 and raw["bf16"] == {"enabled": True}


def test_mfu_bench_prints_both_runs_and_their_ratio(capsys):
    assert main(["--model", "tiny", "--seq", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = {
        m.group(1): float(m.group(2).replace(",", ""))
        for m in re.finditer(r"^\| (trident|pytorch) \| [\d.]+ \| ([\d,]+) \|", out, re.M)
    }
    assert set(rows) == {"trident", "pytorch"} and all(v > 0 for v in rows.values())
    assert re.search(r"^trident / baseline throughput: [\d.]+x$", out, re.M)
    assert "GPU figures are unmeasured" in out
