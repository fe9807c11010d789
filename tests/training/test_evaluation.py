"""Validation during training: every train.eval_interval steps, train.eval_iters global batches of the
held-out split are scored and logged as val_loss / val_ppl; the final evaluation reports the same."""

from __future__ import annotations

import json
import math

from tests.data.data_helpers import write_random_shards
from tests.helpers import make_config, make_trainer


def test_eval_interval_and_eval_iters(tmp_path):
    write_random_shards(str(tmp_path / "web"), [40 + 7 * i for i in range(60)], vocab=96)
    cfg = make_config(
        tmp_path,
        data={
            "datasets": [{"prefix": str(tmp_path / "web")}],
            "valid_fraction": 0.2,
            "synthetic": False,
            "cache_dir": str(tmp_path / "cache"),
        },
        train={"max_steps": 6, "log_interval": 1, "progress": False, "eval_interval": 2, "eval_iters": 3},
    )
    trainer = make_trainer(cfg)
    calls = []
    forward_only = trainer.runner.forward_only
    trainer.runner.forward_only = lambda batches: calls.append(len(batches)) or forward_only(batches)
    summary = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"])) for r in rows if "val_loss" in r)
    # 3 evaluations in the loop + the final one, each eval_iters batches of 4 micro-batches (8 = 4 x 2)
    assert calls == [4] * (3 * 4)
    assert summary["eval"]["val_loss"] == rows[-1]["val_loss"]  # no training between the two
