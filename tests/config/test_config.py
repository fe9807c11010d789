import json
import subprocess
import sys

import pytest

from engine.config import load_config, parse_config, resolve_batch
from engine.errors import ConfigError

OK = {"train_batch_size": 8}


def err(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({**OK, "modle": {}}, "modle: unknown key (hint: did you mean 'model'?)"),
        ({**OK, "model": {"n_layer": 2}}, "model.n_layer: unknown key (hint: did you mean 'n_layers'?)"),
        (
            {**OK, "zero_optimization": {"reduce_bucket_sise": 5}},
            "zero_optimization.reduce_bucket_sise: unknown key (hint: did you mean 'reduce_bucket_size'?)",
        ),
        ({**OK, "model": {"n_layers": 0}}, "model.n_layers: must be >= 1, got 0"),
        ({**OK, "model": {"n_layers": "two"}}, "model.n_layers: expected integer, got 'two'"),
        ({**OK, "model": {"n_layers": True}}, "model.n_layers: expected integer, got true"),
        ({"train_batch_size": -4}, "train_batch_size: must be >= 1, got -4"),
        ({"train_batch_size": "auto"}, 'train_batch_size: "auto" needs a value'),
        ({**OK, "model": {"arch": "gpt3"}}, 'model.arch: \'gpt3\' is not one of "gpt2", "llama" (hint: did you mean'),
        (
            {**OK, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            "zero_optimization.offload_optimizer: optimizer offload to CPU/NVMe is not supported by Trident",
        ),
        (
            {**OK, "zero_optimization": {"cpu_offload": True}},
            "zero_optimization.cpu_offload: is deprecated (DeepSpeed replaced it by offload_optimizer)",
        ),
        ({**OK, "amp": {"enabled": True}}, "amp: NVIDIA apex AMP is not supported by Trident"),
        ({**OK, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled and bf16.enabled are both true"),
        ({**OK, "bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "bfloat16: given twice"),
        ({}, "train_batch_size: either train_batch_size or train_micro_batch_size_per_gpu must be given"),
        (
            {**OK, "scheduler": {"type": "WarmupCosineLR", "params": {}}},
            "scheduler.params.total_num_steps: required by WarmupCosineLR",
        ),
        ({**OK, "model": {"d_model": 100, "n_heads": 3}}, "model.d_model: 100 is not divisible by n_heads=3"),
        ({**OK, "optimizer": {"params": {"betas": [0.9]}}}, "optimizer.params.betas: expected two numbers"),
        ({**OK, "data": {"datasets": [{"weight": 1}]}}, "data.datasets[0].prefix: required key is missing"),
        ({**OK, "data": {"datasets": []}}, "data.datasets: no datasets given"),
        ({**OK, "parallel": {"tensor": 5}}, "parallel.tensor: 5 must divide model.n_heads=12"),
        ({**OK, "communication_data_type": "fp16"}, 'communication_data_type: "fp16" is not supported'),
        (
            {**OK, "zero_optimization": {"stage": 2, "reduce_scatter": False}},
            "zero_optimization.reduce_scatter: false is not one of true (hint: must be true: stages 1-3 always "
            "reduce-scatter gradients",
        ),
        (
            {**OK, "zero_optimization": {"allgather_partitions": False}},
            "zero_optimization.allgather_partitions: false is not one of true",
        ),
        (
            {**OK, "zero_optimization": {"contiguous_gradients": False}},
            "zero_optimization.contiguous_gradients: false is not one of true",
        ),
        (
            {**OK, "zero_optimization": {"ignore_unused_parameters": False}},
            "zero_optimization.ignore_unused_parameters: false is not one of true",
        ),
    ],
)
def test_refusals_name_the_key(raw, expected):
    assert err(raw).startswith(expected)


def test_switched_off_deepspeed_features_are_accepted():
    cfg = parse_config(
        {
            **OK,
            "flops_profiler": {"enabled": False},
            "bfloat16": {"enabled": True},
            "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8, "offload_optimizer": {"device": "none"}},
        }
    )
    assert cfg.bf16.enabled and cfg.zero_optimization.reduce_bucket_size == 500_000_000


def test_deepspeed_fp16_defaults():
    fp16 = parse_config({**OK, "fp16": {"enabled": True}}).fp16
    assert (
        fp16.loss_scale,
        fp16.initial_scale_power,
        fp16.loss_scale_window,
        fp16.hysteresis,
        fp16.consecutive_hysteresis,
        fp16.min_loss_scale,
    ) == (0.0, 16, 1000, 2, False, 1.0)


@pytest.mark.parametrize(
    "given, dp, expected",
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
        ({"train_batch_size": 16}, 4, (16, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 3}, 2, (6, 3, 1)),
        (
            {"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4},
            2,
            (24, 3, 4),
        ),
    ],
)
def test_batch_triangle_like_deepspeed(given, dp, expected):
    b = resolve_batch(parse_config(given), dp)
    assert (b.global_batch, b.micro_batch, b.grad_accum) == expected


@pytest.mark.parametrize(
    "given, dp",
    [
        ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2),
        ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 3}, 2),
        ({"train_batch_size": 2}, 4),
    ],
)
def test_inconsistent_batch_sizes_refused(given, dp):
    with pytest.raises(ConfigError, match=r"^train_batch_size: \d+ != train_micro_batch_size_per_gpu"):
        resolve_batch(parse_config(given), dp)


def test_overrides_and_duplicate_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**OK, "model": {"n_layers": 2}}))
    cfg = load_config(
        str(path),
        [
            "model.n_layers=4",
            "model.arch=llama",
            "train.log_dir=runs/x",
            'data.datasets=[{"prefix": "d/web", "weight": 0.5}]',
        ],
    )
    assert (cfg.model.n_layers, cfg.model.arch, cfg.train.log_dir) == (4, "llama", "runs/x")
    assert cfg.data.datasets[0].prefix == "d/web" and cfg.data.datasets[0].weight == 0.5
    path.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(str(path))
    path.write_text('{"train_batch_size": 8,}')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(str(path))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**OK, "optimizer": {"params": {"lr": 1e-3, "weight_decya": 0.1}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "engine.train", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: optimizer.params.weight_decya: unknown key (hint: did you mean 'weight_decay'?)"
    ]


def test_layout_needing_more_processes_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**OK, "parallel": {"tensor": 2}, "data": {"synthetic": True}}))
    proc = subprocess.run(
        [sys.executable, "-m", "engine.train", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: world size 1 is not divisible by parallel.tensor=2 x parallel.pipeline=1 = 2 (hint: launch a "
        "multiple of tensor x pipeline processes, or change the parallel sizes)"
    ]
