"""Config sections. DeepSpeed's keys keep DeepSpeed's names, defaults and meaning; ``model``,
``parallel``, ``data``, ``train`` and ``resilience`` are Trident's own (see docs/architecture.md and the
generated reference docs/config.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from engine.config.schema import field
from engine.errors import ConfigError

# ---------------------------------------------------------------- DeepSpeed sections


@dataclass(frozen=True)
class AdamParams:
    lr: float = field(1e-3, doc="peak learning rate", min=0.0)
    betas: tuple[float, ...] = field((0.9, 0.999), doc="Adam (beta1, beta2)")
    eps: float = field(1e-8, doc="Adam epsilon", gt=0.0)
    weight_decay: float = field(0.0, doc="decoupled weight decay (AdamW); applied to matrices only", min=0.0)
    adam_w_mode: bool = field(True, doc="DeepSpeed's Adam: true = decoupled decay (AdamW), false = L2 in grad")
    bias_correction: bool = field(True, doc="Adam bias correction")
    amsgrad: bool = field(False, doc="must be false: AMSGrad is not implemented", choices=(False,))
    torch_adam: bool = field(
        False,
        doc="no effect: DeepSpeed's choice between torch.optim.Adam and its own fused "
        "Adam; Trident always runs its own AdamW over flat fp32 buffers",
    )
    fused: bool = field(
        False, doc="no effect: DeepSpeed's fused-kernel switch; Trident fuses the update when model.kernels is on"
    )

    def validate(self, path: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{path}.betas: expected two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class OptimizerConfig:
    type: Literal["Adam", "AdamW", "adam", "adamw"] = field(
        "AdamW", doc="Adam (DeepSpeed: decoupled decay unless adam_w_mode=false) or AdamW"
    )
    params: AdamParams = field(doc="optimizer hyper-parameters", factory=AdamParams)

    @property
    def decoupled(self) -> bool:
        return self.type.lower() == "adamw" or self.params.adam_w_mode


@dataclass(frozen=True)
class SchedulerParams:
    warmup_min_lr: float = field(0.0, doc="WarmupLR/WarmupDecayLR: LR at the start of warmup", min=0.0)
    warmup_max_lr: float | None = field(None, doc="WarmupLR/WarmupDecayLR: LR after warmup (default: optimizer lr)")
    warmup_num_steps: int = field(1000, doc="warmup length in optimizer steps", min=1)
    warmup_type: Literal["log", "linear"] = field("log", doc="warmup curve (DeepSpeed default: log)")
    total_num_steps: int | None = field(None, doc="WarmupDecayLR/WarmupCosineLR: length of the schedule", min=1)
    warmup_min_ratio: float = field(0.0, doc="WarmupCosineLR: warmup start as a fraction of lr", min=0.0)
    cos_min_ratio: float = field(0.0001, doc="WarmupCosineLR: final LR as a fraction of lr", min=0.0)
    last_batch_iteration: int = field(
        -1, doc="must be -1: the schedule position is restored from the checkpoint, not set by hand", choices=(-1,)
    )


@dataclass(frozen=True)
class SchedulerConfig:
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"] = field(
        "WarmupCosineLR", doc="DeepSpeed scheduler name"
    )
    params: SchedulerParams = field(doc="scheduler parameters", factory=SchedulerParams)

    def validate(self, path: str) -> None:
        if self.type in ("WarmupDecayLR", "WarmupCosineLR") and self.params.total_num_steps is None:
            raise ConfigError(f"{path}.params.total_num_steps: required by {self.type}")


@dataclass(frozen=True)
class FP16Config:
    enabled: bool = field(False, doc="fp16 compute with fp32 master weights and loss scaling")
    loss_scale: float = field(0.0, doc="0 = dynamic loss scaling; > 0 = this static scale", min=0.0)
    initial_scale_power: int = field(16, doc="dynamic scaling starts at 2**initial_scale_power", min=0, max=64)
    loss_scale_window: int = field(1000, doc="clean steps before the scale doubles", min=1)
    hysteresis: int = field(2, doc="overflows tolerated before the scale halves", min=1)
    consecutive_hysteresis: bool = field(False, doc="refill hysteresis after every clean step")
    min_loss_scale: float = field(1.0, doc="floor of the dynamic scale", gt=0.0)
    auto_cast: bool = field(False, doc="must be false: Trident casts the model itself", choices=(False,))
    fp16_master_weights_and_grads: bool = field(False, doc="must be false: masters are fp32", choices=(False,))


@dataclass(frozen=True)
class BF16Config:
    enabled: bool = field(False, doc="bf16 compute with fp32 master weights (no loss scaling)")
    immediate_grad_update: bool = field(
        False,
        doc="no effect: gradients are always accumulated into fp32 as soon "
        "as autograd produces them, what DeepSpeed's true does",
    )
    bf16_master_weights_and_grads: bool = field(
        False, doc="must be false: masters and gradients are fp32", choices=(False,)
    )
    bf16_optimizer_states: bool = field(False, doc="must be false: Adam moments are fp32", choices=(False,))


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = field(
        0, doc="ZeRO stage: 0 (plain DP), 1 (optimizer states), 2 (+gradients), 3 (+parameters)", min=0, max=3
    )
    reduce_bucket_size: int = field(500_000_000, doc="elements per gradient reduction bucket", min=1)
    allgather_bucket_size: int = field(
        500_000_000,
        doc="stages 1-2: at most this many elements per post-step "
        "parameter all-gather (larger buckets are gathered in pieces)",
        min=1,
    )
    overlap_comm: bool = field(
        False,
        doc="overlap gradient reduction with backward (stages 2-3 reduce a bucket "
        "block by block as backward completes them)",
    )
    contiguous_gradients: bool = field(
        True, doc="must be true: gradients always accumulate into contiguous flat buffers", choices=(True,)
    )
    reduce_scatter: bool = field(
        True,
        doc="must be true: stages 1-3 always reduce-scatter gradients (DeepSpeed's false all-reduces them instead)",
        choices=(True,),
    )
    allgather_partitions: bool = field(
        True,
        doc="must be true: updated partitions are always all-gathered (DeepSpeed's false broadcasts them instead)",
        choices=(True,),
    )
    round_robin_gradients: bool = field(
        False,
        doc="no effect: in DeepSpeed it only changes how gradients are "
        "copied to CPU for offload, which Trident does not have",
    )
    stage3_prefetch_bucket_size: int = field(
        50_000_000, doc="stage 3: elements to prefetch ahead", min=0, alias="prefetch_bucket_size"
    )
    stage3_param_persistence_threshold: int = field(
        100_000, doc="stage 3: params smaller stay whole", min=0, alias="param_persistence_threshold"
    )
    stage3_max_live_parameters: int = field(
        1_000_000_000,
        doc="stage 3: gathered elements alive at once "
        "(prefetch and kept blocks stop at it; the block computed is "
        "always gathered)",
        min=1,
        alias="max_live_parameters",
    )
    stage3_max_reuse_distance: int = field(
        1_000_000_000,
        doc="stage 3: a block used again within this many "
        "gathered elements stays gathered from its forward to its "
        "backward (0: always released)",
        min=0,
        alias="max_reuse_distance",
    )
    stage3_gather_16bit_weights_on_model_save: bool = field(
        False,
        doc="stage 3: beside each checkpoint, rank 0 also "
        "writes the whole model gathered from the shards in the "
        "compute dtype (model_16bit.safetensors)",
        alias="gather_16bit_weights_on_model_save",
    )
    sub_group_size: int = field(
        1_000_000_000,
        doc="no effect: DeepSpeed steps the optimizer in sub-groups to bound "
        "its temporaries; Trident's fused AdamW updates the shard in place without any",
        min=1,
    )
    load_from_fp32_weights: bool = field(
        True,
        doc="on load, take the fp32 master weights from the checkpoint's fp32 "
        "copies (true) or re-derive them from its bf16/fp16 model weights, keeping "
        "their rounding (false)",
    )
    elastic_checkpoint: bool = field(
        False, doc="no effect: checkpoints always load at another data-parallel size (resharded on load)"
    )
    ignore_unused_parameters: bool = field(
        True,
        doc="must be true: parameters that get no gradient keep a zero gradient (DeepSpeed's false raises instead)",
        choices=(True,),
    )


@dataclass(frozen=True)
class ActivationCheckpointingConfig:
    """DeepSpeed's section. Which layers recompute is chosen by ``model.recompute``."""

    partition_activations: bool = field(False, doc="must be false (not implemented)", choices=(False,))
    cpu_checkpointing: bool = field(False, doc="must be false (no CPU offload)", choices=(False,))
    contiguous_memory_optimization: bool = field(False, doc="must be false", choices=(False,))
    number_checkpoints: int | None = field(
        None,
        doc="no effect: DeepSpeed sizes its contiguous activation buffer "
        "with it, which needs contiguous_memory_optimization (refused)",
    )
    synchronize_checkpoint_boundary: bool = field(
        False,
        doc="no effect: DeepSpeed's device synchronize at each "
        "checkpoint boundary, a profiling aid; Trident never "
        "needs it for correctness",
    )
    profile: bool = field(False, doc="must be false", choices=(False,))


@dataclass(frozen=True)
class TensorBoardConfig:
    enabled: bool = field(False, doc="write TensorBoard scalars")
    output_path: str = field("", doc="directory (default: train.log_dir)")
    job_name: str = field("", doc="sub-directory name")


@dataclass(frozen=True)
class WandbConfig:
    """DeepSpeed's Weights & Biases monitor: rank 0 logs every metrics.jsonl scalar (needs ``pip install wandb``
    and a login or WANDB_API_KEY; WANDB_MODE=offline works without network)."""

    enabled: bool = field(False, doc="log metrics to Weights & Biases")
    project: str = field("deepspeed", doc="W&B project (DeepSpeed's default name)")
    group: str | None = field(None, doc="W&B run group")
    team: str | None = field(None, doc="W&B entity (team or user)")

    def validate(self, path: str) -> None:
        import importlib.util

        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"{path}.enabled: true but the wandb package is not installed",
                hint="pip install wandb, or set wandb.enabled=false",
            )


# ---------------------------------------------------------------- Trident sections


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["gpt2", "llama"] = field("gpt2", doc="gpt2: LayerNorm, GELU, biases; llama: RMSNorm, SwiGLU")
    n_layers: int = field(12, doc="transformer blocks", min=1)
    d_model: int = field(768, doc="hidden size", min=1)
    n_heads: int = field(12, doc="attention heads", min=1)
    n_kv_heads: int | None = field(None, doc="KV heads for grouped-query attention (default n_heads)", min=1)
    ffn_hidden: int | None = field(None, doc="MLP width (default 4*d_model; llama: 2/3 of that, rounded)", min=1)
    seq_len: int = field(1024, doc="tokens per sample (samples hold seq_len+1 tokens)", min=1)
    vocab_size: int = field(50304, doc="vocabulary size (embedding rows)", min=1)
    position: Literal["learned", "rope", "alibi"] | None = field(
        None, doc="position encoding (default: learned for gpt2, rope for llama)"
    )
    rope_theta: float = field(10000.0, doc="RoPE base", gt=0.0)
    tie_embeddings: bool = field(True, doc="share the input embedding with the output head")
    dropout: float = field(0.0, doc="dropout probability (attention and residual)", min=0.0, max=1.0)
    norm_eps: float | None = field(None, doc="norm epsilon (default 1e-5 LayerNorm, 1e-6 RMSNorm)", gt=0.0)
    init_std: float = field(0.02, doc="N(0, init_std) init; residual projections / sqrt(2*n_layers)", gt=0.0)
    recompute: Literal["none", "full", "selective"] = field(
        "none", doc="activation checkpointing per layer: full block, or only the attention core"
    )
    kernels: bool | None = field(None, doc="fused Triton kernels (default: on for CUDA)")

    def validate(self, path: str) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"{path}.d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"{path}.n_kv_heads: n_heads={self.n_heads} is not a multiple of {self.kv_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"{path}.position: rope needs an even head dim, got {self.head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def pos(self) -> str:
        return self.position or ("learned" if self.arch == "gpt2" else "rope")

    @property
    def eps(self) -> float:
        return self.norm_eps or (1e-5 if self.arch == "gpt2" else 1e-6)

    @property
    def ffn(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.arch == "gpt2":
            return 4 * self.d_model
        # SwiGLU keeps the parameter count of a 4d GELU MLP: 2/3 * 4d, rounded up to a multiple of 64.
        return -(-int(8 * self.d_model / 3) // 64) * 64


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = field(1, doc="tensor-parallel size", min=1)
    pipeline: int = field(1, doc="pipeline-parallel size", min=1)
    sequence_parallel: bool = field(False, doc="shard norm/dropout regions along the sequence (needs tensor>1)")
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved", "zb-h1"] = field(
        "1f1b", doc="pipeline schedule (zb-h1: zero-bubble H1, backward split into input and weight passes)"
    )
    virtual_stages: int = field(1, doc="model chunks per pipeline rank (interleaved 1F1B)", min=1)


@dataclass(frozen=True)
class DatasetEntry:
    prefix: str = field(doc="path prefix of a .bin/.idx pair (or shard set)")
    weight: float = field(1.0, doc="sampling weight (normalized over datasets)", gt=0.0)


@dataclass(frozen=True)
class DataConfig:
    datasets: tuple[DatasetEntry, ...] = field((), doc="training datasets and their mixing weights")
    valid_datasets: tuple[DatasetEntry, ...] = field((), doc="separate validation datasets (optional)")
    valid_fraction: float = field(
        0.0, doc="fraction of each dataset's documents held out for validation", min=0.0, max=0.5
    )
    seed: int = field(1234, doc="seed of the global shuffle and blending")
    synthetic: bool = field(False, doc="random tokens instead of datasets (benchmarks)")
    cache_dir: str | None = field(None, doc="where sample indices are cached (default: beside the data)")
    tokenizer: str | None = field(None, doc="SentencePiece model for samples (default: the one beside the data)")

    def validate(self, path: str) -> None:
        if not self.synthetic and not self.datasets:
            raise ConfigError(
                f"{path}.datasets: no datasets given",
                hint='add {"prefix": ..., "weight": ...} entries or set data.synthetic=true',
            )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = field(1000, doc="optimizer steps to run", min=1)
    seed: int = field(42, doc="model init / dropout seed")
    log_interval: int | None = field(None, doc="steps between metric lines (default: steps_per_print)", min=1)
    log_dir: str = field("runs/default", doc="metrics.jsonl and TensorBoard go here")
    save_dir: str | None = field(None, doc="checkpoint directory (default: no checkpoints)")
    save_interval: int = field(0, doc="steps between checkpoints (0: only at the end)", min=0)
    keep_last: int = field(3, doc="complete checkpoints to keep", min=1)
    async_save: bool = field(
        False,
        doc="write checkpoints on a background thread (Megatron-LM's --async-save): "
        "training pauses only to copy its state to host memory (one copy of this "
        "rank's state; on CUDA pinned and kept for reuse) while a thread writes the "
        "shard; the checkpoint is committed (manifest, latest) at the next save, a "
        "rollback or the end of the run, and until then latest names the previous "
        "one",
    )
    resume: bool | Literal["auto"] = field(False, doc="true: resume (error if none); auto: resume if present")
    eval_interval: int = field(0, doc="steps between validation runs (0: off)", min=0)
    eval_iters: int = field(10, doc="validation batches per evaluation", min=1)
    peak_tflops: float | None = field(None, doc="device peak for MFU (default: from the device table)", gt=0.0)
    decay_embeddings: bool = field(False, doc="apply weight decay to embeddings too")
    progress: bool = field(True, doc="live progress bar on rank 0")
    device: Literal["auto", "cpu", "cuda"] = field("auto", doc="auto: cuda when available")
    init_from_hf: str | None = field(None, doc="start from a local Hugging Face GPT-2/Llama checkpoint directory")
    cuda_graphs: bool = field(
        False,
        doc="replay each micro-batch's forward and backward as CUDA graphs (removes "
        "the host's launch overhead; CUDA, pp=1, tp=1, no dropout, ZeRO <= 2)",
    )


@dataclass(frozen=True)
class RollbackConfig:
    """Automatic recovery from loss spikes, NaNs and fp16 loss-scale collapse (OPT-175B / PaLM practice):
    restore the last good checkpoint, scale the LR down, and skip the offending window of batches."""

    enabled: bool = field(False, doc="roll back automatically (needs train.save_dir and periodic saves)")
    on_nan: bool = field(True, doc="trigger on a NaN/Inf loss or gradient norm")
    spike_factor: float = field(0.0, doc="trigger when loss > spike_factor x its moving average (0: off)", min=0.0)
    spike_window: int = field(20, doc="steps in the loss moving average", min=1)
    spike_patience: int = field(1, doc="consecutive spiking steps before triggering", min=1)
    scale_floor_steps: int = field(
        0,
        doc="trigger after this many overflowing steps at the fp16 scale floor (0: stop with an error instead)",
        min=0,
    )
    lr_factor: float = field(0.5, doc="multiply the learning rate by this at each rollback", gt=0.0, max=1.0)
    max_rollbacks: int = field(5, doc="give up (error) after this many rollbacks", min=1)


@dataclass(frozen=True)
class ResilienceConfig:
    collective_timeout_s: float = field(600.0, doc="process-group timeout in seconds", gt=0.0)
    heartbeat_timeout_s: float = field(
        60.0,
        doc="exit every rank when a peer has not sent a heartbeat for this "
        "long, e.g. stopped or killed (0: no watchdog)",
        min=0.0,
    )
    heartbeat_interval_s: float = field(1.0, doc="seconds between heartbeats of each rank", gt=0.0)
    rollback: RollbackConfig = field(doc="automatic rollback on loss spikes / NaNs", factory=RollbackConfig)

    def validate(self, path: str) -> None:
        if self.heartbeat_timeout_s and self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"{path}.heartbeat_timeout_s: {self.heartbeat_timeout_s} s must be at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s} s)",
                hint="a peer is declared lost only after several missed heartbeats",
            )


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
