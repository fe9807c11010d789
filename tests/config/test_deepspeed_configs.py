"""Realistic DeepSpeed configs (tests/config/deepspeed/, written after the Hugging Face Trainer templates,
Megatron-DeepSpeed and DeepSpeed's own examples) are either accepted with DeepSpeed's meaning or refused
in one line that names the key and says why."""

from __future__ import annotations

import pathlib

import pytest

from engine.config import load_config, resolve_batch
from engine.errors import ConfigError

HERE = pathlib.Path(__file__).parent / "deepspeed"
AUTO_HINT = " (hint: 'auto' is filled in by the Hugging Face Trainer integration; Trident needs the number itself)"

REFUSED = {
    "hf_trainer_zero2_auto.json": 'fp16.enabled: "auto" needs a value' + AUTO_HINT,
    "auto_batch_size.json": 'train_batch_size: "auto" needs a value' + AUTO_HINT,
    "hf_trainer_zero3_offload.json": (
        "zero_optimization.offload_optimizer: optimizer offload to CPU/NVMe is not supported by Trident"
    ),
    "zero3_nvme_aio.json": "aio: async I/O (NVMe offload) is not supported by Trident",
    "deprecated_cpu_offload.json": "zero_optimization.cpu_offload: is deprecated (DeepSpeed replaced it by "
    "offload_optimizer), and optimizer offload is not supported by Trident",
    "deprecated_fp16_gather.json": "zero_optimization.stage3_gather_fp16_weights_on_model_save: is deprecated: "
    "use stage3_gather_16bit_weights_on_model_save",
    "flops_profiler_on.json": "flops_profiler: the flops profiler is not supported by Trident; metrics.jsonl "
    "reports tflops and mfu each step",
    "comm_dtype_bf16.json": 'communication_data_type: "bf16" is not supported: gradients are reduced in fp32 '
    'for exact results; use "fp32" or omit',
    "activation_partitioning.json": "activation_checkpointing.partition_activations: true is not one of false "
    "(hint: must be false (not implemented))",
    "typo_in_zero_section.json": "zero_optimization.overlap_com: unknown key (hint: did you mean 'overlap_comm'?)",
    "grad_accum_bf16.json": 'data_types: only {"grad_accum_dtype": "fp32"} is supported: Trident accumulates '
    "gradients in fp32",
}


def test_every_file_has_an_expected_outcome():
    assert {p.name for p in HERE.glob("*.json")} == set(REFUSED) | {
        "megatron_deepspeed_bf16.json",
        "zero3_native_keys.json",
        "fp16_dynamic_loss_scale.json",
    }


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_in_one_line_naming_the_key(name):
    with pytest.raises(ConfigError) as err:
        load_config(str(HERE / name))
    assert str(err.value) == REFUSED[name]
    assert "\n" not in str(err.value)


def test_megatron_deepspeed_config_keeps_deepspeed_meaning():
    cfg = load_config(str(HERE / "megatron_deepspeed_bf16.json"))
    assert cfg.bf16.enabled and cfg.dtype_name == "bf16"  # the "bfloat16" alias
    z = cfg.zero_optimization
    assert (z.stage, z.reduce_bucket_size, z.allgather_bucket_size, z.overlap_comm) == (
        1,
        500_000_000,
        500_000_000,
        True,
    )
    assert cfg.log_interval == 2000  # steps_per_print
    assert cfg.communication_data_type == "fp32" and cfg.gradient_clipping == 1.0
    assert cfg.tensorboard.enabled and cfg.tensorboard.job_name == "gpt"
    assert not cfg.wandb.enabled and cfg.wandb.project == "megatron"
    assert resolve_batch(cfg, 8).grad_accum == 16  # 512 = 4 x 16 x 8, as DeepSpeed derives it


def test_zero3_config_with_deepspeed_field_names():
    """DeepSpeed accepts both stage3_* names and their short field names; offloads set to "none" are off."""
    cfg = load_config(str(HERE / "zero3_native_keys.json"))
    z = cfg.zero_optimization
    assert (z.stage, z.stage3_prefetch_bucket_size, z.stage3_param_persistence_threshold) == (3, 50_000_000, 100_000)
    assert z.stage3_max_live_parameters == z.stage3_max_reuse_distance == 1_000_000_000
    assert z.stage3_gather_16bit_weights_on_model_save
    assert cfg.optimizer.decoupled  # DeepSpeed's Adam with adam_w_mode=true is AdamW
    assert cfg.scheduler.type == "WarmupDecayLR" and cfg.scheduler.params.warmup_max_lr == 1e-4
    assert resolve_batch(cfg, 4).global_batch == 64


def test_fp16_dynamic_loss_scaling_keys():
    fp16 = load_config(str(HERE / "fp16_dynamic_loss_scale.json")).fp16
    assert (
        fp16.enabled,
        fp16.loss_scale,
        fp16.initial_scale_power,
        fp16.loss_scale_window,
        fp16.hysteresis,
        fp16.min_loss_scale,
    ) == (True, 0.0, 12, 500, 2, 1.0)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"wandb": {"enabled": False, "projct": "x"}}, "wandb.projct: unknown key (hint: did you mean 'project'?)"),
        (
            {"checkpoint": {"tag_validation": "Fail"}},
            "checkpoint: DeepSpeed's checkpoint section is not used; set train.save_dir, train.save_interval and "
            "train.keep_last (Trident's checkpoints are atomic and verified on load)",
        ),
        (
            {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}},
            'zero_optimization.stage3_max_live_parameters: "auto" needs a value' + AUTO_HINT,
        ),
        (
            {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
            "bf16.bf16_master_weights_and_grads: true is not one of false (hint: must be false: masters and gradients "
            "are fp32)",
        ),
    ],
)
def test_inline_refusals(raw, expected):
    from engine.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"train_batch_size": 8, **raw})
    assert str(err.value) == expected
