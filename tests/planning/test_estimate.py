"""engine.plan's estimates (engine/planning/estimate.py): ZeRO model-state bytes per device (Rajbhandari
et al. 2019, with Trident's fp32 gradients), activation bytes per layer (Korthikanti et al. 2022, table 2),
and the CLI's refusals."""

from __future__ import annotations

import json

import pytest

from engine.errors import ConfigError
from engine.plan import main as plan_main
from engine.planning import activation_bytes_per_layer, zero_model_state_breakdown, zero_model_state_bytes

PSI = 1_000_000


@pytest.mark.parametrize(
    "stage, expected",
    [
        (0, {"params": 2 * PSI, "grads": 4 * PSI, "optimizer": 12 * PSI}),
        (1, {"params": 2 * PSI, "grads": 4 * PSI, "optimizer": 12 * PSI / 8}),
        (2, {"params": 2 * PSI, "grads": 4 * PSI / 8, "optimizer": 12 * PSI / 8}),
        (3, {"params": 2 * PSI / 8, "grads": 4 * PSI / 8, "optimizer": 12 * PSI / 8}),
    ],
)
def test_zero_stages_shard_optimizer_then_gradients_then_parameters(stage, expected):
    assert zero_model_state_breakdown(PSI, stage, 8) == expected
    assert zero_model_state_bytes(PSI, stage, 8) == sum(expected.values())


def test_fp32_stage0_parameters_are_the_masters():
    assert zero_model_state_breakdown(PSI, 0, 1, param_bytes=4) == {
        "params": 4 * PSI,
        "grads": 4 * PSI,
        "optimizer": 8 * PSI,
    }


def test_activation_bytes_follow_korthikanti_table_2():
    s, b, h, a, t = 2048, 4, 4096, 32, 8
    sbh = s * b * h
    kw = dict(seq=s, micro_batch=b, hidden=h, heads=a, tp=t)
    assert activation_bytes_per_layer(**kw, sequence_parallel=False, recompute="none") == sbh * (
        10 + 24 / t + 5 * a * s / (h * t)
    )
    assert activation_bytes_per_layer(**kw, sequence_parallel=True, recompute="none") == sbh * (34 + 5 * a * s / h) / t
    assert activation_bytes_per_layer(**kw, sequence_parallel=True, recompute="selective") == sbh * 34 / t
    assert activation_bytes_per_layer(**kw, sequence_parallel=False, recompute="full") == 2 * sbh


def test_cli_refuses_bad_layouts_and_mfu(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_batch_size": 8, "parallel": {"tensor": 2}}))
    with pytest.raises(ConfigError, match=r"--world-size: 3 is not divisible by tensor 2 x pipeline 1"):
        plan_main(["--config", str(path), "--world-size", "3"])
    with pytest.raises(ConfigError, match=r"--mfu: 1.5 must be in \(0, 1\]"):
        plan_main(["--config", str(path), "--mfu", "1.5"])
