"""DeepSpeed keys that Trident does not implement, each refused by name with the reason.

Keys listed here are accepted only when they ask for nothing (``false``, ``null``, ``{}``, or
``{"enabled": false}``); anything else is refused, never silently ignored.
"""

from __future__ import annotations

UNSUPPORTED = "is not supported by Trident"

REFUSALS: dict[str, str] = {
    # top level
    "amp": f"NVIDIA apex AMP {UNSUPPORTED}; use bf16 or fp16",
    "flops_profiler": f"the flops profiler {UNSUPPORTED}; metrics.jsonl reports tflops and mfu each step",
    "autotuning": f"autotuning {UNSUPPORTED}; use python -m engine.plan to size a layout",
    "elasticity": f"elastic training {UNSUPPORTED}",
    "compression_training": f"compression training {UNSUPPORTED}",
    "sparse_attention": f"sparse attention {UNSUPPORTED}",
    "data_efficiency": f"data efficiency (curriculum/sampling) {UNSUPPORTED}",
    "curriculum_learning": f"curriculum learning {UNSUPPORTED}",
    "aio": f"async I/O (NVMe offload) {UNSUPPORTED}",
    "nebula": f"Nebula checkpointing {UNSUPPORTED}; Trident's checkpoints are atomic already",
    "wandb": f"the wandb monitor section {UNSUPPORTED} yet",
    "csv_monitor": f"the csv monitor {UNSUPPORTED}; metrics.jsonl is written always",
    "comms_logger": f"the comms logger {UNSUPPORTED}; metrics.jsonl reports comm_bytes per group",
    "quantize_training": f"quantized training {UNSUPPORTED}",
    "eigenvalue": f"eigenvalue computation {UNSUPPORTED}",
    "progressive_layer_drop": f"progressive layer drop {UNSUPPORTED}",
    "pipeline": "DeepSpeed's pipeline section is not used; set parallel.pipeline and parallel.pipeline_schedule",
    "fp8": f"fp8 training {UNSUPPORTED}",
    "wall_clock_breakdown": f"wall_clock_breakdown {UNSUPPORTED}; metrics.jsonl reports step throughput",
    "memory_breakdown": f"memory_breakdown {UNSUPPORTED}; metrics.jsonl reports peak memory",
    "dump_state": f"dump_state {UNSUPPORTED}",
    "prescale_gradients": f"prescale_gradients {UNSUPPORTED}; gradients are averaged in fp32",
    "sequence_parallel_size": "DeepSpeed-Ulysses is not supported; use parallel.sequence_parallel with "
                              "parallel.tensor",
    "zero_force_ds_cpu_optimizer": f"CPU optimizers {UNSUPPORTED}",
    "load_universal_checkpoint": "universal checkpoints are not used; Trident reshards its own on load",
    # zero_optimization
    "zero_optimization.offload_optimizer": f"optimizer offload to CPU/NVMe {UNSUPPORTED}",
    "zero_optimization.offload_param": f"parameter offload to CPU/NVMe {UNSUPPORTED}",
    "zero_optimization.cpu_offload": "is deprecated (DeepSpeed replaced it by offload_optimizer), and "
                                     f"optimizer offload {UNSUPPORTED}",
    "zero_optimization.cpu_offload_params": "is deprecated (DeepSpeed replaced it by offload_param), and "
                                            f"parameter offload {UNSUPPORTED}",
    "zero_optimization.cpu_offload_use_pin_memory": "is deprecated (replaced by offload_*.pin_memory), and "
                                                    f"offload {UNSUPPORTED}",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save":
        "is deprecated: use stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.zero_quantized_weights": f"ZeRO++ quantized weights {UNSUPPORTED}",
    "zero_optimization.zero_quantized_gradients": f"ZeRO++ quantized gradients {UNSUPPORTED}",
    "zero_optimization.zero_hpz_partition_size": f"ZeRO++ hierarchical partitioning {UNSUPPORTED}",
    "zero_optimization.mics_shard_size": f"MiCS sharding {UNSUPPORTED}",
    "zero_optimization.legacy_stage1": f"legacy_stage1 {UNSUPPORTED}",
}

# Keys whose value must be one fixed value (e.g. a data type Trident always uses).
DEEPSPEED_ONLY_VALUES: dict[str, tuple[object, str]] = {
    "communication_data_type": ("fp32", "gradients are reduced in fp32 for exact results; use \"fp32\" or omit"),
    "gradient_predivide_factor": (1.0, "gradients are averaged exactly once; omit or set 1.0"),
}
