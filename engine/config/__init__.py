"""Typed, frozen configuration loaded from DeepSpeed-style JSON.

``load_config(path, overrides=[...])`` parses and validates everything before any compute;
``resolve_batch(cfg, dp_size)`` derives the batch-size triangle exactly as DeepSpeed does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from engine.config.deepspeed_keys import DEEPSPEED_ONLY_VALUES, REFUSALS
from engine.config.schema import build, field
from engine.config.sections import (
    ActivationCheckpointingConfig,
    AdamParams,
    BF16Config,
    DataConfig,
    DatasetEntry,
    FP16Config,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ResilienceConfig,
    SchedulerConfig,
    SchedulerParams,
    TensorBoardConfig,
    TrainConfig,
    WandbConfig,
    ZeroConfig,
)
from engine.errors import ConfigError

__all__ = [
    "AdamParams",
    "BF16Config",
    "BatchSizes",
    "DataConfig",
    "DatasetEntry",
    "FP16Config",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ResilienceConfig",
    "SchedulerConfig",
    "SchedulerParams",
    "TrainConfig",
    "TridentConfig",
    "ZeroConfig",
    "load_config",
    "parse_config",
    "resolve_batch",
]


@dataclass(frozen=True)
class TridentConfig:
    train_batch_size: int | None = field(None, doc="global batch in samples (= micro * accumulation * dp)", min=1)
    train_micro_batch_size_per_gpu: int | None = field(None, doc="samples per micro-batch per rank", min=1)
    gradient_accumulation_steps: int | None = field(None, doc="micro-batches per optimizer step", min=1)
    optimizer: OptimizerConfig = field(doc="DeepSpeed optimizer section", factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = field(None, doc="DeepSpeed scheduler section (default: constant lr)")
    gradient_clipping: float = field(0.0, doc="clip the global gradient norm to this (0: off)", min=0.0)
    fp16: FP16Config = field(doc="fp16 mixed precision", factory=FP16Config)
    bf16: BF16Config = field(doc="bf16 mixed precision (alias: bfloat16)", factory=BF16Config, alias="bfloat16")
    zero_optimization: ZeroConfig = field(doc="ZeRO sharding", factory=ZeroConfig)
    steps_per_print: int = field(10, doc="default for train.log_interval", min=1)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        doc="DeepSpeed's activation checkpointing section", factory=ActivationCheckpointingConfig
    )
    tensorboard: TensorBoardConfig = field(doc="TensorBoard output", factory=TensorBoardConfig)
    wandb: WandbConfig = field(doc="Weights & Biases monitor (DeepSpeed's section)", factory=WandbConfig)
    communication_data_type: str | None = field(None, doc="must be fp32 or omitted")
    gradient_predivide_factor: float | None = field(None, doc="must be 1.0 or omitted")
    zero_allow_untested_optimizer: bool = field(
        False,
        doc="no effect: DeepSpeed's permission to run ZeRO with a "
        "client optimizer; Trident's ZeRO runs only its own AdamW",
    )
    model: ModelConfig = field(doc="the transformer", factory=ModelConfig)
    parallel: ParallelConfig = field(doc="tensor/pipeline layout (dp is derived)", factory=ParallelConfig)
    data: DataConfig = field(doc="datasets and sampling", factory=lambda: DataConfig(synthetic=True))
    train: TrainConfig = field(doc="loop, logging and checkpointing", factory=TrainConfig)
    resilience: ResilienceConfig = field(doc="fault tolerance", factory=ResilienceConfig)

    def validate(self, path: str) -> None:
        if self.fp16.enabled and self.bf16.enabled:
            raise ConfigError("fp16.enabled and bf16.enabled are both true", hint="pick one precision")
        for key, (allowed, why) in DEEPSPEED_ONLY_VALUES.items():
            value = getattr(self, key)
            if value is not None and value != allowed:
                raise ConfigError(f"{key}: {json.dumps(value)} is not supported: {why}")
        if self.train_batch_size is None and self.train_micro_batch_size_per_gpu is None:
            raise ConfigError(
                "train_batch_size: either train_batch_size or train_micro_batch_size_per_gpu must be given"
            )
        if self.parallel.sequence_parallel and self.parallel.tensor == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tensor > 1")
        if self.parallel.pipeline_schedule == "interleaved" and self.parallel.virtual_stages < 2:
            raise ConfigError("parallel.virtual_stages: the interleaved schedule needs virtual_stages >= 2")
        if self.parallel.virtual_stages > 1 and self.parallel.pipeline_schedule != "interleaved":
            raise ConfigError('parallel.virtual_stages: > 1 needs pipeline_schedule "interleaved"')
        m = self.model
        if m.n_layers < self.parallel.pipeline * self.parallel.virtual_stages:
            raise ConfigError(
                f"parallel.pipeline: {self.parallel.pipeline} stages x {self.parallel.virtual_stages} virtual "
                f"stages need at least that many layers, model.n_layers is {m.n_layers}"
            )
        tp = self.parallel.tensor
        if m.dropout > 0 and m.recompute != "none" and tp > 1:
            raise ConfigError(
                f'model.recompute: "{m.recompute}" with model.dropout > 0 and parallel.tensor > 1 '
                "would replay different dropout masks in recomputation",
                hint='set model.dropout=0 (usual for pretraining) or model.recompute="none"',
            )
        if m.n_heads % tp or m.kv_heads % tp:
            raise ConfigError(
                f"parallel.tensor: {tp} must divide model.n_heads={m.n_heads} and n_kv_heads={m.kv_heads}"
            )

    @property
    def dtype_name(self) -> str:
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"

    @property
    def log_interval(self) -> int:
        return self.train.log_interval or self.steps_per_print


@dataclass(frozen=True)
class BatchSizes:
    global_batch: int
    micro_batch: int
    grad_accum: int
    dp: int


def resolve_batch(cfg: TridentConfig, dp: int) -> BatchSizes:
    """Fill in the batch triangle as DeepSpeed does (any two give the third), then check it exactly."""
    tb, mb, ga = cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    if tb is not None and mb is not None and ga is not None:
        pass
    elif tb is not None and mb is not None:
        ga = tb // mb // dp
    elif tb is not None and ga is not None:
        mb = tb // dp // ga
    elif mb is not None and ga is not None:
        tb = mb * ga * dp
    elif tb is not None:
        ga, mb = 1, tb // dp
    else:
        assert mb is not None  # validated at parse time
        ga, tb = 1, mb * dp
    if mb < 1 or ga < 1 or tb != mb * ga * dp:
        raise ConfigError(
            f"train_batch_size: {tb} != train_micro_batch_size_per_gpu {mb} * gradient_accumulation_steps "
            f"{ga} * data-parallel size {dp}",
            hint="give two of the three and let Trident derive the third",
        )
    return BatchSizes(global_batch=tb, micro_batch=mb, grad_accum=ga, dp=dp)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"{key}: duplicate key in the JSON object", hint="each key may appear once")
        seen[key] = value
    return seen


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"--set value {text[:20]}...: JSON nested too deeply") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b=value`` overrides (value parsed as JSON, else taken as a string)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.max_steps=100")
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not an object")
            node = child
        node[parts[-1]] = _parse_value(text)
    return raw


def parse_config(raw: Any, *, source: str = "config") -> TridentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    return build(TridentConfig, raw, "", REFUSALS)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err.message}", hint=err.hint) from None
    return raw


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TridentConfig:
    """Read, override and validate a config; raises ConfigError naming the key path."""
    raw = read_json(path) if path else {}
    if not isinstance(raw, dict):  # before the overrides, which walk into it
        raise ConfigError(f"{path}: the top level must be a JSON object")
    raw = apply_overrides(raw, list(overrides))
    return parse_config(raw, source=path or "config")


def config_to_dict(cfg: TridentConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
