"""DeepSpeed keys that Trident does not implement, each refused by name with the reason.

Keys listed here are accepted only when they ask for nothing (``false``, ``null``, ``{}``, or
``{"enabled": false}``); anything else is refused, never silently ignored.
"""

from __future__ import annotations

UNSUPPORTED = "is not supported by Trident"


class Refusal(str):
    """A refusal reason that also names the values which ask for exactly what Trident does anyway
    (e.g. ``data_types: {"grad_accum_dtype": "fp32"}``): those are accepted with DeepSpeed's meaning."""

    accepts: tuple = ()

    def __new__(cls, reason: str, *, accepts: tuple = ()) -> Refusal:
        obj = super().__new__(cls, reason)
        obj.accepts = accepts
        return obj


NO_EFFECT = "ZeRO-3 tuning of DeepSpeed's module hooks, which Trident does not have"

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
    "sequence_parallel_size": "DeepSpeed-Ulysses is not supported; use parallel.sequence_parallel with parallel.tensor",
    "zero_force_ds_cpu_optimizer": f"CPU optimizers {UNSUPPORTED}",
    "load_universal_checkpoint": "universal checkpoints are not used; Trident reshards its own on load",
    "data_types": Refusal(
        'only {"grad_accum_dtype": "fp32"} is supported: Trident accumulates gradients in fp32',
        accepts=({"grad_accum_dtype": "fp32"},),
    ),
    "checkpoint": Refusal(
        "DeepSpeed's checkpoint section is not used; set train.save_dir, train.save_interval "
        "and train.keep_last (Trident's checkpoints are atomic and verified on load)",
        accepts=({"tag_validation": "Warn"}, {"tag_validation": "Ignore"}),
    ),
    "dataloader_drop_last": Refusal(
        "Trident's loader never drops data: the global sample order covers max_steps * train_batch_size samples",
        accepts=(True,),
    ),
    "seq_parallel_communication_data_type": Refusal(
        "DeepSpeed-Ulysses is not supported (sequence parallelism reduces in the compute dtype with "
        "parallel.sequence_parallel)",
        accepts=("fp32",),
    ),
    "disable_allgather": f"disable_allgather {UNSUPPORTED}; ZeRO parameters are always all-gathered",
    "torch_autocast": f"torch autocast {UNSUPPORTED}; use bf16 or fp16, which cast the model itself",
    "gradient_accumulation_dtype": f"gradient_accumulation_dtype {UNSUPPORTED}; gradients accumulate in fp32",
    "comet": f"the Comet monitor {UNSUPPORTED}; metrics.jsonl and TensorBoard are written",
    "sparse_gradients": f"sparse gradients {UNSUPPORTED}",
    "compile": f"DeepSpeed's compile section {UNSUPPORTED}",
    "hybrid_engine": f"the hybrid engine (RLHF generation) {UNSUPPORTED}",
    "weight_quantization": f"weight quantization {UNSUPPORTED}",
    "timers": f"DeepSpeed's timers {UNSUPPORTED}; metrics.jsonl reports step_time_s",
    # zero_optimization
    "zero_optimization.offload_optimizer": f"optimizer offload to CPU/NVMe {UNSUPPORTED}",
    "zero_optimization.offload_param": f"parameter offload to CPU/NVMe {UNSUPPORTED}",
    "zero_optimization.cpu_offload": "is deprecated (DeepSpeed replaced it by offload_optimizer), and "
    f"optimizer offload {UNSUPPORTED}",
    "zero_optimization.cpu_offload_params": "is deprecated (DeepSpeed replaced it by offload_param), and "
    f"parameter offload {UNSUPPORTED}",
    "zero_optimization.cpu_offload_use_pin_memory": "is deprecated (replaced by offload_*.pin_memory), and "
    f"offload {UNSUPPORTED}",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": (
        "is deprecated: use stage3_gather_16bit_weights_on_model_save"
    ),
    "zero_optimization.zero_quantized_weights": f"ZeRO++ quantized weights {UNSUPPORTED}",
    "zero_optimization.zero_quantized_gradients": f"ZeRO++ quantized gradients {UNSUPPORTED}",
    "zero_optimization.zero_hpz_partition_size": f"ZeRO++ hierarchical partitioning {UNSUPPORTED}",
    "zero_optimization.mics_shard_size": f"MiCS sharding {UNSUPPORTED}",
    "zero_optimization.legacy_stage1": f"legacy_stage1 {UNSUPPORTED}",
    "zero_optimization.zero_quantized_nontrainable_weights": f"ZeRO++ quantized weights {UNSUPPORTED}",
    "zero_optimization.zenflow": f"ZenFlow offloading {UNSUPPORTED}",
    "zero_optimization.memory_efficient_linear": Refusal(f"{NO_EFFECT}; omit it", accepts=(True,)),
    "zero_optimization.stage3_model_persistence_threshold": Refusal(
        f"{NO_EFFECT}; use stage3_param_persistence_threshold", accepts=(9223372036854775807, "auto")
    ),
    "zero_optimization.stage3_module_granularity_threshold": Refusal(f"{NO_EFFECT}; omit it", accepts=(0,)),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": f"all-reduce parameter fetching {UNSUPPORTED}",
    "zero_optimization.stage3_allgather_sequential": Refusal(f"{NO_EFFECT}; omit it", accepts=(False,)),
    "zero_optimization.use_multi_rank_bucket_allreduce": Refusal(
        "Trident reduces each bucket with one collective over the data-parallel group; omit it", accepts=(True,)
    ),
    "zero_optimization.enable_sanity_checks": Refusal("ZeRO-3 sanity checks are not implemented", accepts=(False,)),
    "zero_optimization.log_trace_cache_warnings": Refusal(f"{NO_EFFECT}; omit it", accepts=(False,)),
    "zero_optimization.override_module_apply": Refusal(f"{NO_EFFECT}; omit it", accepts=(True,)),
    "zero_optimization.pipeline_loading_checkpoint": f"pipeline_loading_checkpoint {UNSUPPORTED}",
    "zero_optimization.leaf_module": f"ZeRO-3 leaf modules {UNSUPPORTED}",
    "zero_optimization.parameter_alignment": f"parameter_alignment {UNSUPPORTED}",
}

# Keys whose value must be one fixed value (e.g. a data type Trident always uses).
DEEPSPEED_ONLY_VALUES: dict[str, tuple[object, str]] = {
    "communication_data_type": ("fp32", 'gradients are reduced in fp32 for exact results; use "fp32" or omit'),
    "gradient_predivide_factor": (1.0, "gradients are averaged exactly once; omit or set 1.0"),
}
